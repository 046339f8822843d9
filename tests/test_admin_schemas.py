"""List answers validate against the schemas of the gateways we follow (the seed pages)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from admin_support import ADMIN, admin_client, admin_settings

SEEDS = Path("/work/shared/seeds")
if not SEEDS.is_dir():  # pragma: no cover
    SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"

pytestmark = pytest.mark.skipif(not SEEDS.is_dir(), reason="the seed pages are not here")


def _seed(name_part: str) -> str:
    return next(p for p in SEEDS.glob("*.txt") if name_part in p.read_text())


def _openapi_block(marker: str) -> dict[str, Any]:
    text = next(p.read_text() for p in SEEDS.glob("*.txt") if marker in p.read_text())
    block = re.search(r"````yaml[^\n]*\n(.*?)\n````", text, re.S)
    assert block is not None
    return yaml.safe_load(block[1])  # type: ignore[no-any-return]


def _nullable(schema: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` in JSON Schema terms."""
    if isinstance(schema, dict):
        out = {k: _nullable(v) for k, v in schema.items() if k != "nullable"}
        if schema.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(schema, list):
        return [_nullable(v) for v in schema]
    return schema


def _example_schema(value: Any) -> dict[str, Any]:
    """A strict schema inferred from a documentation example (Bifrost's reference pages)."""
    if isinstance(value, dict):
        return {"type": "object", "properties": {k: _example_schema(v) for k, v in value.items()}}
    if isinstance(value, list):
        return {"type": "array", "items": _example_schema(value[0]) if value else {}}
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int | float):
        return {"type": "number"}
    return {"type": "string"}


def _example_block(marker: str) -> dict[str, Any]:
    text = next(p.read_text() for p in SEEDS.glob("*.txt") if marker in p.read_text())
    start = text.index("{")
    example, _ = json.JSONDecoder().raw_decode(text[start:])
    return example  # type: ignore[no-any-return]


def _relax_provider_config_id(schema: Any) -> Any:
    """Two known differences from an example: Bifrost's example shows `provider_config_id` as an
    integer, SPEC §9 makes every id a string; `config_hash` is null for manual entries, as
    Bifrost's own list-budgets schema allows (`nullable: true`)."""
    if isinstance(schema, dict):
        out = {k: _relax_provider_config_id(v) for k, v in schema.items()}
        properties = out.get("properties", {})
        if "provider_config_id" in properties:
            properties["provider_config_id"] = {"type": "string"}
        if "config_hash" in properties:
            properties["config_hash"] = {"type": ["string", "null"]}
        return out
    return schema


async def _populate(c: Any) -> None:
    limits = {
        "budgets": [{"max_limit": 10, "reset_duration": "1d"}],
        "rate_limit": {"request_max_limit": 5, "request_reset_duration": "1m",
                       "token_max_limit": 1000, "token_reset_duration": "1h"},
    }  # fmt: skip
    key = (await c.post("/virtual-keys", json={"name": "k", **limits}, headers=ADMIN)).json()
    await c.put("/providers/openai", json=limits, headers=ADMIN)
    body = {"model_name": "gpt-4o", "provider": "openai", "scope": "virtual_key",
            "scope_id": key["virtual_key"]["id"], **limits}  # fmt: skip
    assert (await c.post("/model-configs", json=body, headers=ADMIN)).status_code == 201


async def test_budget_list_matches_bifrost_and_gomodel(tmp_path: Path) -> None:
    bifrost = _nullable(_openapi_block("/api/governance/budgets"))
    bifrost_schema = bifrost["paths"]["/api/governance/budgets"]["get"]["responses"]["200"]
    gomodel = _nullable(_openapi_block("get /admin/budgets"))
    gomodel_schema = {
        "$ref": "#/components/schemas/admin.budgetListResponse",
        "components": gomodel["components"],
    }
    async with admin_client(admin_settings(tmp_path)) as c:
        await _populate(c)
        answer = (await c.get("/budgets", headers=ADMIN)).json()
    assert answer["count"] == 3
    jsonschema.validate(answer, bifrost_schema["content"]["application/json"]["schema"])
    jsonschema.validate(answer, gomodel_schema)


async def test_provider_and_model_config_lists_match_bifrost(tmp_path: Path) -> None:
    providers = _relax_provider_config_id(
        _example_schema(_example_block("governance\n/\nproviders"))
    )
    models = _relax_provider_config_id(
        _example_schema(_example_block("governance\n/\nmodel-configs"))
    )
    async with admin_client(admin_settings(tmp_path)) as c:
        await _populate(c)
        provider_list = (await c.get("/providers", headers=ADMIN)).json()
        model_list = (await c.get("/model-configs", headers=ADMIN)).json()
    assert provider_list["count"] == 1 and model_list["total_count"] == 1
    jsonschema.validate(provider_list, providers)
    jsonschema.validate(model_list, models)
