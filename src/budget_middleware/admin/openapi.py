"""The OpenAPI 3.1 document of the admin API, built from the route table and the pydantic models.

Paths are relative to where the app is mounted (`GET /openapi.json` gives the mount point as its
`servers`; `/` here). The document is the contract the app enforces: every status a route can
answer is listed (422 on every route, for an unknown query parameter; 503 when the store is down),
and request schemas say all that is checked (no U+0000 in any text, the rules that tie fields
together). A schema-driven fuzzer (tests/test_admin_fuzz.py) holds the two together.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel

from budget_middleware.admin.context import Operation
from budget_middleware.admin.dashboard import ASSETS
from budget_middleware.admin.envelopes import ErrorAnswer
from budget_middleware.manage import schemas
from budget_middleware.manage.schemas import NO_NUL

_REF = "#/components/schemas/{model}"


def _collect(
    model: type[BaseModel],
    found: dict[str, Any],
    mode: Literal["validation", "serialization"] = "serialization",
) -> dict[str, str]:
    """Put the model (and the models it uses) in `found`; return a reference to it. Request
    bodies are described as they are validated, answers as they are serialised."""
    schema = model.model_json_schema(ref_template=_REF, mode=mode)
    if mode == "validation":
        _no_nul(schema)
    for name, definition in schema.pop("$defs", {}).items():
        found.setdefault(name, definition)
    found.setdefault(model.__name__, schema)
    return {"$ref": _REF.format(model=model.__name__)}


def _no_nul(schema: Any) -> None:
    """Every free text of a request (a string without format, enum, const or pattern) gets the
    pattern that says it holds no U+0000, as the app checks."""
    if isinstance(schema, list):
        for item in schema:
            _no_nul(item)
        return
    if not isinstance(schema, dict):
        return
    if schema.get("type") == "string" and not {"format", "enum", "const", "pattern"} & set(schema):
        schema["pattern"] = NO_NUL
    for key, value in schema.items():
        if key in ("properties", "$defs", "patternProperties", "dependentSchemas"):
            for item in value.values():
                _no_nul(item)
        elif key in ("items", "additionalProperties", "not", "if", "then", "else",
                     "anyOf", "allOf", "oneOf", "prefixItems", "contains"):  # fmt: skip
            _no_nul(value)


def _operation(op: Operation, found: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.handler.__name__,
        "tags": [op.tag],
        "responses": {},
    }
    if op.description:
        entry["description"] = op.description
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _path_schema(op, name)}
        for name in _path_names(op.path)
    ]
    params += [
        {"name": q.name, "in": "query", "required": False, "schema": q.openapi()}
        | ({"description": q.description} if q.description else {})
        for q in op.query
    ]
    if params:
        entry["parameters"] = params
    if op.body is not None:
        entry["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _collect(op.body, found, "validation")}},
        }
    answers = {422: ErrorAnswer, 503: ErrorAnswer, **op.answers}  # any route can answer these
    if op.body is not None:
        answers[413] = ErrorAnswer  # a body over the admin API's bound (context.MAX_BODY_BYTES)
    for status, model in sorted(answers.items()):
        answer: dict[str, Any] = {"description": _describe(status)}
        if model is not None:
            answer["content"] = {"application/json": {"schema": _collect(model, found)}}
        entry["responses"][str(status)] = answer
    if op.auth == "admin":
        entry["security"] = [{"AdminKey": []}]
    elif op.auth == "virtual_key":
        entry["security"] = [{"VirtualKey": []}, {"VirtualKeyBearer": []}]
    else:
        entry["security"] = []
    return entry


def _error_answer(found: dict[str, Any], text: str) -> dict[str, Any]:
    schema = _collect(ErrorAnswer, found)
    return {"description": text, "content": {"application/json": {"schema": schema}}}


def _path_schema(op: Operation, name: str) -> dict[str, Any]:
    schema = dict(op.path_schema(name))
    schema.setdefault("pattern", NO_NUL)
    return schema


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _describe(status: int) -> str:
    return {
        200: "OK",
        201: "Created",
        401: "Missing or wrong credential",
        404: "Not found",
        409: "Conflict: duplicate name or reset_duration",
        413: "The body is over 64 MiB",
        422: "Invalid body or parameter, or an unknown query parameter",
        501: "prometheus-client is not installed",
        503: "The admin API is disabled (BUDGET_ADMIN_KEY unset), or a part is down",
    }.get(status, "Answer")


def openapi_document(operations: Iterable[Operation]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, found)
    errors = {str(status): _error_answer(found, _describe(status)) for status in (401, 422, 503)}
    paths["/openapi.json"] = {
        "get": {
            "security": [{"AdminKey": []}],
            "summary": "This document",
            "operationId": "openapi",
            "responses": {
                "200": {"description": "OpenAPI 3.1 document",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                **errors,
            },
        }
    }  # fmt: skip
    paths["/metrics"] = {
        "get": {
            "security": [{"AdminKey": []}],
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "responses": {
                "200": {"description": "Prometheus text", "content": {"text/plain": {}}},
                **errors,
                "501": _error_answer(found, _describe(501)),
            },
        }
    }
    paths.update(_dashboard_paths(found))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "budget-middleware admin API",
            "version": "1",
            "description": schemas.__doc__ or "",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(found.items())),
            "securitySchemes": {
                "AdminKey": {"type": "http", "scheme": "bearer", "description": "BUDGET_ADMIN_KEY"},
                "VirtualKey": {"type": "apiKey", "in": "header", "name": "x-budget-key"},
                "VirtualKeyBearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def _dashboard_paths(found: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's page and assets (SPEC §16): no admin key (they hold no data, SPEC §9),
    GET (and HEAD); a copy the client holds (`If-None-Match`) is answered 304."""
    unchanged = {"description": "Not modified: the copy the client holds (If-None-Match)"}
    return {
        "/ui": {
            "get": {
                "security": [],
                "summary": "The dashboard's page",
                "operationId": "dashboard",
                "responses": {
                    "200": {"description": "The page", "content": {"text/html": {}}},
                    "304": unchanged,
                },
            }
        },
        "/ui/{asset}": {
            "get": {
                "security": [],
                "summary": "An asset of the dashboard's page",
                "operationId": "dashboard_asset",
                "parameters": [
                    {
                        "name": "asset",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": sorted(ASSETS)},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The asset",
                        "content": {media: {} for media in sorted(set(ASSETS.values()))},
                    },
                    "304": unchanged,
                    "404": _error_answer(found, "No such asset"),
                },
            }
        },
    }
