"""Who may use the admin API: the bearer of BUDGET_ADMIN_KEY, never a virtual key."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from admin_support import ADMIN, admin_client, admin_settings
from budget_middleware.manage.manager import BudgetManager
from budget_middleware.store.database import Store


async def test_without_admin_key_every_route_but_health_answers_503_naming_the_variable(
    tmp_path: Path,
) -> None:
    async with admin_client(admin_settings(tmp_path, admin_key=None)) as c:
        r = await c.get("/customers", headers=ADMIN)
        assert r.status_code == 503 and "BUDGET_ADMIN_KEY" in r.json()["error"]["message"]
        assert (await c.get("/openapi.json")).status_code == 503
        assert (await c.get("/health")).status_code == 200


async def test_missing_or_wrong_bearer_answers_401(tmp_path: Path) -> None:
    async with admin_client(admin_settings(tmp_path)) as c:
        assert (await c.get("/customers")).status_code == 401
        r = await c.get("/customers", headers={"Authorization": "Bearer admin-secreT"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        no_scheme = {"Authorization": "admin-secret"}
        assert (await c.get("/customers", headers=no_scheme)).status_code == 401


async def test_a_virtual_key_is_never_an_admin_credential(tmp_path: Path) -> None:
    async with admin_client(admin_settings(tmp_path)) as c:
        key = (await c.post("/virtual-keys", json={"name": "k"}, headers=ADMIN)).json()
        value = key["virtual_key"]["value"]
        r = await c.get("/customers", headers={"Authorization": f"Bearer {value}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "virtual_key_not_allowed"
        assert value not in r.text


async def test_an_admin_key_that_is_also_a_stored_key_value_is_refused(tmp_path: Path) -> None:
    """A key stored with that value where the admin key was not known (the CLI on the store
    without BUDGET_ADMIN_KEY, or an admin key changed since)."""
    settings = admin_settings(tmp_path)
    without_admin_key = admin_settings(tmp_path, admin_key=None)
    store = Store(settings.database_url)
    store.create_schema()
    BudgetManager(store, without_admin_key).create_virtual_key(name="k", value="admin-secret")
    store.dispose()
    async with admin_client(settings) as c:
        r = await c.get("/customers", headers=ADMIN)
        assert r.status_code == 401 and r.json()["error"]["code"] == "virtual_key_not_allowed"


async def test_a_key_may_not_take_the_admin_key_as_its_value(tmp_path: Path) -> None:
    """SPEC §9: a virtual key is never an admin credential. A key created (or given a value)
    with BUDGET_ADMIN_KEY's value was accepted (201), and from then on the admin key itself was
    refused as a virtual key's: the admin API locked its operator out. It is a 409 naming
    `value`, and the admin key keeps working."""
    async with admin_client(admin_settings(tmp_path)) as c:
        body = {"name": "k", "value": "admin-secret"}
        created = await c.post("/virtual-keys", json=body, headers=ADMIN)
        print("a key valued as the admin key:", created.status_code, created.text)
        assert created.status_code == 409 and created.json()["error"]["param"] == "value"
        assert "admin-secret" not in created.text
        key = (await c.post("/virtual-keys", json={"name": "k"}, headers=ADMIN)).json()
        path = f"/virtual-keys/{key['virtual_key']['id']}"
        updated = await c.put(path, json={"value": "admin-secret"}, headers=ADMIN)
        assert updated.status_code in (409, 422)  # 422: an update takes no value at all
        after = await c.get("/customers", headers=ADMIN)
        print("the admin key afterwards:", after.status_code)
        assert after.status_code == 200


async def test_quota_answers_the_calling_keys_own_limits_with_status(tmp_path: Path) -> None:
    async with admin_client(admin_settings(tmp_path)) as c:
        team = {"name": "t", "budgets": [{"max_limit": 100, "reset_duration": "1M"}]}
        team_id = (await c.post("/teams", json=team, headers=ADMIN)).json()["team"]["id"]
        body = {"name": "alice", "team_id": team_id,
                "budgets": [{"max_limit": 1, "reset_duration": "1d"}],
                "rate_limit": {"token_max_limit": 1000, "token_reset_duration": "1h"}}  # fmt: skip
        value = (await c.post("/virtual-keys", json=body, headers=ADMIN)).json()["virtual_key"][
            "value"
        ]
        for headers in ({"x-budget-key": value}, {"Authorization": f"Bearer {value}"},
                        {"x-api-key": value}):  # fmt: skip
            r = await c.get("/virtual-keys/quota", headers=headers)
            assert r.status_code == 200
            answer = r.json()
            assert answer["virtual_key"]["name"] == "alice" and "value" not in answer["virtual_key"]
            assert [b["amount"] for b in answer["budgets"]] == [1.0]  # not the team's
            assert answer["rate_limits"][0]["token_max_limit"] == 1000
            assert value not in r.text
        assert (await c.get("/virtual-keys/quota")).status_code == 401
        r = await c.get("/virtual-keys/quota", headers={"x-budget-key": "sk-bm-unknown"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_virtual_key"
        r = await c.get("/virtual-keys/quota", headers=ADMIN)
        assert r.status_code == 401  # the admin key is not a virtual key


async def test_the_wsgi_admin_reads_a_body_for_exactly_the_bearers_the_api_admits(
    tmp_path: Path,
) -> None:
    """One reading of `Authorization: Bearer …` for the admin API and for the WSGI admin app,
    which reads a request's body only for the admin key's bearer (`holds_admin_key`): for every
    spelling, the WSGI side reads the body exactly when the API admits the caller."""
    from budget_middleware.wsgi.admin import holds_admin_key

    spellings = [
        "Bearer admin-secret",
        "bearer admin-secret",
        "BEARER   admin-secret  ",
        "Bearer admin-secreT",
        "Bearer",
        "Bearer ",
        "Basic admin-secret",
        "admin-secret",
        "Bearer\tadmin-secret",
        "Bearer admin-secret extra",
        "",
    ]
    verdicts = []
    async with admin_client(admin_settings(tmp_path)) as c:
        for value in spellings:
            r = await c.get("/customers", headers={"Authorization": value} if value else {})
            reads = holds_admin_key({"HTTP_AUTHORIZATION": value}, "admin-secret")
            verdicts.append((value, r.status_code, reads))
    print(verdicts)
    assert [v for v in verdicts if (v[1] == 200) != v[2]] == []
    assert sum(1 for v in verdicts if v[2]) == 3  # the three spellings of the admin key


async def test_every_401_names_the_bearer_scheme_in_www_authenticate(tmp_path: Path) -> None:
    """RFC 9110 15.5.2: a 401 carries `WWW-Authenticate`, as FastAPI's `HTTPBearer` sends it
    (`Bearer`); the admin API's and the quota route's 401s had none, so a client (httpx's auth
    flows, a generated client) could not tell which credential to send."""
    async with admin_client(admin_settings(tmp_path)) as c:
        value = (await c.post("/virtual-keys", json={"name": "k"}, headers=ADMIN)).json()[
            "virtual_key"
        ]["value"]
        asked = [
            ("/customers", {}),
            ("/customers", {"Authorization": "Bearer admin-secreT"}),
            ("/customers", {"Authorization": f"Bearer {value}"}),
            ("/virtual-keys/quota", {}),
            ("/virtual-keys/quota", {"Authorization": "Bearer sk-bm-unknown-0000"}),
        ]
        seen = []
        for path, headers in asked:
            r = await c.get(path, headers=headers)
            seen.append((path, r.status_code, r.headers.get("www-authenticate")))
        ok = await c.get("/customers", headers=ADMIN)
    print(seen)
    assert seen == [(path, 401, "Bearer") for path, _ in asked]
    assert "www-authenticate" not in ok.headers


async def test_a_key_value_no_request_could_present_is_refused_at_write_time(
    tmp_path: Path,
) -> None:
    """SPEC §4: a request's key is read from a header, trimmed, as the latin-1 text of its
    bytes. A value chosen at create (`value`) with a blank at an end (pasted with its line
    break) or a character outside printable ASCII (which httpx, the SDKs' client, cannot send,
    and curl sends as UTF-8) was accepted (201), and every request presenting it was refused
    401 `invalid_virtual_key`: a key handed out that could never be used. It is a 422 naming
    `value` (never showing it), as BUDGET_ADMIN_KEY's own rule refuses such a key at start-up."""
    from budget_middleware import create_admin_app
    from support import chat, client, host_app

    settings = admin_settings(tmp_path)
    app = host_app(settings)
    app.mount("/admin", create_admin_app(settings))
    values = ["sk-bm-team-key-0001\n", " sk-bm-team-key-0002", "sk-bm-équipe-key-0003"]
    async with client(app) as c:
        seen = []
        for n, value in enumerate(values):
            body = {"name": f"k{n}", "value": value}
            created = await c.post("/admin/virtual-keys", json=body, headers=ADMIN)
            sent = None
            if created.status_code == 201:  # presented as a client sends it: trimmed, UTF-8
                bearer = b"Bearer " + value.strip().encode()
                answer = await c.post("/v1/chat/completions", json=chat(),
                                      headers=[(b"authorization", bearer)])  # fmt: skip
                sent = (answer.status_code, answer.json()["error"]["code"])
            seen.append((value, created.status_code, sent))
        print("created, then presented:", seen)  # before: 201, then 401 invalid_virtual_key
        assert [status for _, status, _ in seen] == [422, 422, 422]
        for value in values:
            refused = await c.post("/admin/virtual-keys", json={"name": "x", "value": value},
                                   headers=ADMIN)  # fmt: skip
            assert refused.json()["error"]["param"] == "value"
            assert value.strip() not in refused.text
        # A value of printable ASCII, spaces inside, is one a request presents.
        body = {"name": "spaced", "value": "sk-bm-our team key 4"}
        created = await c.post("/admin/virtual-keys", json=body, headers=ADMIN)
        assert created.status_code == 201
        for header in ({"x-api-key": "sk-bm-our team key 4"},
                       {"Authorization": "Bearer sk-bm-our team key 4"}):  # fmt: skip
            answer = await c.post("/v1/chat/completions", json=chat(), headers=header)
            assert answer.status_code == 200
    # The OpenAPI document's pattern states exactly that rule.
    from budget_middleware.core.identity import KEY_VALUE_PATTERN, key_value_problem

    pattern = re.compile(KEY_VALUE_PATTERN.removesuffix("$") + r"\Z")
    for value in [*values, "sk-bm-our team key 4", "a\tb", "a\x7fb", "~!x", "a\xa0", "k" * 9]:
        assert (pattern.match(value) is not None) == (key_value_problem(value) is None), value
    manager = BudgetManager(Store(settings.database_url), settings)
    key = manager.create_virtual_key(name="file-key")
    try:  # a config file's value (`set_virtual_key_value`) meets the same rule
        manager.set_virtual_key_value(key.id, "sk-bm-from-a-file-5\n")
        raised = None
    except Exception as exc:
        raised = exc
    print("a file's value with its line break:", repr(raised))
    assert raised is not None and getattr(raised, "param", None) == "value"


async def test_an_authorization_header_sent_twice_is_read_alike_by_the_asgi_and_wsgi_admin(
    tmp_path: Path,
) -> None:
    """Two `Authorization` headers, the admin key's and another: ASGI keeps both, and the admin
    API (Starlette's `request.headers`) read the first; a WSGI server joins them into one
    `HTTP_AUTHORIZATION` (`a,b` gunicorn and werkzeug, `a, b` waitress: PEP 3333 has one value a
    name), and `create_admin_wsgi_app()` read that whole as the token: the same request was
    served 200 by one and refused 401 `invalid_admin_key` by the other (and the quota route's
    key: 200 and 401 `invalid_virtual_key`). Both read the first value now, as the middleware
    reads a virtual key sent twice: the admin key first is admitted, second is refused."""
    from wsgiref.util import setup_testing_defaults

    from budget_middleware.wsgi import create_admin_wsgi_app

    settings = admin_settings(tmp_path)
    wsgi = create_admin_wsgi_app(settings)

    def over_wsgi(path: str, values: list[str], joiner: str) -> tuple[int, str]:
        environ: dict[str, Any] = {"PATH_INFO": path, "HTTP_AUTHORIZATION": joiner.join(values)}
        setup_testing_defaults(environ)
        statuses: list[str] = []
        body = b"".join(wsgi(environ, lambda status, headers: statuses.append(status)))  # type: ignore[arg-type, func-returns-value]
        status = int(statuses[0].split()[0])
        return status, json.loads(body)["error"]["code"] if status != 200 else ""

    seen = []
    async with admin_client(settings) as c:
        created = await c.post("/virtual-keys", json={"name": "k"}, headers=ADMIN)
        value = created.json()["virtual_key"]["value"]
        cases = [
            ("/customers", ["Bearer admin-secret", "Bearer junk"]),
            ("/customers", ["Bearer junk", "Bearer admin-secret"]),
            ("/customers", [f"Bearer {value}", "Bearer admin-secret"]),
            ("/virtual-keys/quota", [f"Bearer {value}", "Bearer junk"]),
            ("/virtual-keys/quota", ["Bearer sk-bm-junk", f"Bearer {value}"]),
        ]
        for path, values in cases:
            r = await c.get(path, headers=[("authorization", v) for v in values])
            asgi = (r.status_code, r.json()["error"]["code"] if r.status_code != 200 else "")
            for joiner in (",", ", "):
                answer = await asyncio.to_thread(over_wsgi, path, values, joiner)
                seen.append((path, values[0][:14], repr(joiner), asgi, answer))
    for row in seen:
        print(row)
    assert [row[3] for row in seen] == [
        (200, ""), (200, ""),
        (401, "invalid_admin_key"), (401, "invalid_admin_key"),
        (401, "virtual_key_not_allowed"), (401, "virtual_key_not_allowed"),
        (200, ""), (200, ""),
        (401, "invalid_virtual_key"), (401, "invalid_virtual_key"),
    ]  # fmt: skip
    assert [row for row in seen if row[3] != row[4]] == []
