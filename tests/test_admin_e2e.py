"""End to end through a host app with the middleware and the admin API mounted in it:
create a customer, a team and a key, use the key, rotate it, deactivate it, delete it."""

from __future__ import annotations

from pathlib import Path

from admin_support import ADMIN, admin_settings
from budget_middleware import create_admin_app, get_engine
from support import chat, client, host_app, running


def _key(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def test_a_change_made_through_the_admin_api_applies_to_the_next_request(
    tmp_path: Path,
) -> None:
    settings = admin_settings(tmp_path, exceeded_status=402)
    app = host_app(settings)
    app.mount("/budget-admin", create_admin_app(settings))
    async with running(app), client(app) as http:
        admin = "/budget-admin"
        acme = (await http.post(f"{admin}/customers", json={"name": "acme"}, headers=ADMIN)).json()
        body = {"name": "research", "customer_id": acme["customer"]["id"],
                "budgets": [{"max_limit": 10, "reset_duration": "1d"}]}  # fmt: skip
        team = (await http.post(f"{admin}/teams", json=body, headers=ADMIN)).json()["team"]
        body = {"name": "alice", "team_id": team["id"]}
        key = (await http.post(f"{admin}/virtual-keys", json=body, headers=ADMIN)).json()
        key_id, value = key["virtual_key"]["id"], key["virtual_key"]["value"]

        used = await http.post("/v1/chat/completions", json=chat(), headers=_key(value))
        assert used.status_code == 200
        await get_engine(settings).flush()
        spent = (await http.get(f"{admin}/budgets?owner_type=team", headers=ADMIN)).json()
        assert spent["budgets"][0]["spent"] > 0
        assert spent["budgets"][0]["user_path"] == "/acme/research"

        rotated = await http.post(f"{admin}/virtual-keys/{key_id}/rotate", headers=ADMIN)
        new = rotated.json()["virtual_key"]["value"]
        old = await http.post("/v1/chat/completions", json=chat(), headers=_key(value))
        assert old.status_code == 401
        assert (await http.post("/v1/chat/completions", json=chat(),
                                headers=_key(new))).status_code == 200  # fmt: skip

        off = {"is_active": False}
        await http.put(f"{admin}/virtual-keys/{key_id}", json=off, headers=ADMIN)
        refused = await http.post("/v1/chat/completions", json=chat(), headers=_key(new))
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "virtual_key_inactive"

        await http.delete(f"{admin}/virtual-keys/{key_id}", headers=ADMIN)
        gone = await http.post("/v1/chat/completions", json=chat(), headers=_key(new))
        assert gone.status_code == 401

        tight = {"budgets": [{"max_limit": 0, "reset_duration": "1d"}]}
        await http.put(f"{admin}/teams/{team['id']}", json=tight, headers=ADMIN)
        body = {"name": "bob", "team_id": team["id"]}
        bob = (await http.post(f"{admin}/virtual-keys", json=body, headers=ADMIN)).json()
        blocked = await http.post(
            "/v1/chat/completions", json=chat(), headers=_key(bob["virtual_key"]["value"])
        )
        assert blocked.status_code == 402
