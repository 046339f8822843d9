"""The OpenAPI 3.1 document of the admin API, built from the route table and the pydantic models.

Paths are relative to where the app is mounted (the document's `servers` is `/`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel

from .. import schemas
from .context import Operation
from .envelopes import ErrorAnswer

_REF = "#/components/schemas/{model}"


def _collect(
    model: type[BaseModel],
    found: dict[str, Any],
    mode: Literal["validation", "serialization"] = "serialization",
) -> dict[str, str]:
    """Put the model (and the models it uses) in `found`; return a reference to it. Request
    bodies are described as they are validated, answers as they are serialised."""
    schema = model.model_json_schema(ref_template=_REF, mode=mode)
    for name, definition in schema.pop("$defs", {}).items():
        found.setdefault(name, definition)
    found.setdefault(model.__name__, schema)
    return {"$ref": _REF.format(model=model.__name__)}


def _operation(op: Operation, found: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.handler.__name__,
        "tags": [op.tag],
        "responses": {},
    }
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _path_names(op.path)
    ]
    params += [
        {"name": q.name, "in": "query", "required": False, "schema": dict(q.schema)}
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
    for status, model in op.answers.items():
        answer: dict[str, Any] = {"description": _describe(status)}
        if model is not None:
            answer["content"] = {"application/json": {"schema": _collect(model, found)}}
        entry["responses"][str(status)] = answer
    if op.auth == "admin":
        entry["responses"].setdefault("503", _error_answer(found, "BUDGET_ADMIN_KEY is unset"))
        entry["security"] = [{"AdminKey": []}]
    elif op.auth == "virtual_key":
        entry["security"] = [{"VirtualKey": []}, {"VirtualKeyBearer": []}]
    else:
        entry["security"] = []
    return entry


def _error_answer(found: dict[str, Any], text: str) -> dict[str, Any]:
    schema = _collect(ErrorAnswer, found)
    return {"description": text, "content": {"application/json": {"schema": schema}}}


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _describe(status: int) -> str:
    return {
        200: "OK",
        201: "Created",
        401: "Missing or wrong credential",
        404: "Not found",
        409: "Conflict: duplicate name or reset_duration",
        422: "Invalid body or parameter",
        503: "A part is down",
    }.get(status, "Answer")


def openapi_document(operations: Iterable[Operation]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, found)
    admin: dict[str, Any] = {"security": [{"AdminKey": []}], "responses": {}}
    paths["/openapi.json"] = {
        "get": {
            **admin,
            "summary": "This document",
            "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.1 document"}},
        }
    }
    paths["/metrics"] = {
        "get": {
            **admin,
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "responses": {
                "200": {"description": "Prometheus text", "content": {"text/plain": {}}},
                "401": _error_answer(found, "Missing or wrong credential"),
                "501": _error_answer(found, "prometheus-client is not installed"),
                "503": _error_answer(found, "BUDGET_ADMIN_KEY is unset"),
            },
        }
    }
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
