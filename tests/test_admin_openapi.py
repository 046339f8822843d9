"""The OpenAPI document is valid 3.1, and the API keeps to it under generated requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hypothesis
import jsonschema
import schemathesis
from hypothesis import HealthCheck, given
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from admin_support import ADMIN, admin_client, admin_settings
from budget_middleware import get_engine
from budget_middleware.admin import create_admin_app

# The official OpenAPI 3.1 meta-schema, reduced to what a document must have; each component
# schema must itself be a valid JSON Schema (2020-12), which is what 3.1 uses.
_DOCUMENT = {
    "type": "object",
    "required": ["openapi", "info", "paths"],
    "properties": {
        "openapi": {"type": "string", "pattern": r"^3\.1\.\d+$"},
        "info": {"type": "object", "required": ["title", "version"]},
        "paths": {
            "type": "object",
            "patternProperties": {"^/": {"type": "object"}},
            "additionalProperties": False,
        },
        "components": {"type": "object"},
    },
}


async def test_openapi_document_is_valid_openapi_3_1(tmp_path: Path) -> None:
    async with admin_client(admin_settings(tmp_path)) as c:
        r = await c.get("/openapi.json", headers=ADMIN)
    assert r.status_code == 200
    document = r.json()
    jsonschema.validate(document, _DOCUMENT)
    for name, schema in document["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema), name
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            assert method in {"get", "put", "post", "delete"}, path
            assert "200" in operation["responses"] or "201" in operation["responses"], path
            for param in operation.get("parameters", []):
                jsonschema.Draft202012Validator.check_schema(param["schema"])
    # every route of SPEC §9 is documented
    for path in ("/customers", "/teams/{id}", "/virtual-keys/{id}/rotate", "/virtual-keys/quota",
                 "/budgets", "/budgets/{id}/reset", "/rate-limits", "/providers/{provider}",
                 "/model-configs", "/tags/{tag}", "/usage", "/metrics", "/health",
                 "/ui", "/ui/{asset}"):  # fmt: skip
        assert path in document["paths"], path
    schema = schemathesis.openapi.from_dict(document)
    assert len(list(schema.get_all_operations())) >= 30


async def test_the_document_names_the_mount_point_as_its_server(tmp_path: Path) -> None:
    """A client generated from the document calls the API where it is mounted, not at the
    host's root."""
    settings = admin_settings(tmp_path)
    host = Starlette(routes=[Mount("/budget-admin", app=create_admin_app(settings))])
    async with admin_client(settings, host) as c:
        mounted = (await c.get("/budget-admin/openapi.json", headers=ADMIN)).json()
    async with admin_client(settings) as c:
        alone = (await c.get("/openapi.json", headers=ADMIN)).json()
    assert mounted["servers"] == [{"url": "/budget-admin"}]
    assert alone["servers"] == [{"url": "/"}]
    assert mounted["paths"] == alone["paths"]


def test_generated_requests_get_no_5xx_and_answers_keep_to_the_document(tmp_path: Path) -> None:
    settings = admin_settings(tmp_path)
    app = create_admin_app(settings)
    engine = get_engine(settings)
    with TestClient(app, base_url="http://testserver") as client:
        document = client.get("/openapi.json", headers=ADMIN).json()
        # something to find, so that GET/PUT/DELETE by id meet existing objects too
        client.post("/customers", json={"name": "seed"}, headers=ADMIN)
        schema = schemathesis.openapi.from_dict(document)
        checks = [
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ]
        for result in schema.get_all_operations():
            operation = result.ok()

            @hypothesis.settings(
                max_examples=12,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
            )
            @given(case=operation.as_strategy())
            def check(case: Any) -> None:
                kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=ADMIN)
                for unused in ("app", "cookies"):
                    kwargs.pop(unused, None)
                response = client.request(**kwargs)
                case.validate_response(response, checks=checks)

            check()
        client.portal.call(engine.shutdown)  # type: ignore[union-attr]
    engine.store.dispose()
