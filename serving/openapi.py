"""The OpenAPI document of a running gateway (`GET /openapi.json`): every route with the request
body it really takes, the statuses it answers, and the models it serves.

The routes read their bodies by hand (size limit first, then JSON, then pydantic: `serving.http`),
so FastAPI cannot see the bodies from their signatures; this module describes them from the same
pydantic models that validate them (`InferRequest`, `FeedbackItem`, `OutcomeRecord`), and lists
the served model names as the `name` path parameter's values. The test suite fuzzes the API
against this document (tests/test_openapi_fuzz.py); docs/serving.md describes the routes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from serving.feedback import FeedbackItem
from serving.outcomes_api import OutcomeRecord
from serving.protocol import InferRequest

__all__ = ["ErrorBody", "ERRORS", "errors", "infer_operation", "feedback_operation", "outcomes_operation", "install"]

REF = "#/components/schemas/{model}"


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer: what was wrong, in one line."""

    error: str


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {400: "malformed JSON or tensors", 401: "a missing or wrong bearer token",
            403: "a token that does not cover the ecosystem", 404: "an unknown model, version or route",
            413: "a body over the size limit, or too many rows or items", 422: "a well-formed but invalid item",
            503: "no member could answer, or the outcome store is unavailable (retry)"}
    return {c: {"model": ErrorBody, "description": what[c]} for c in codes}


ERRORS = errors(400, 404, 413, 503)


def _body(ref: str | dict[str, Any]) -> dict[str, Any]:
    schema = {"$ref": REF.format(model=ref)} if isinstance(ref, str) else ref
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def infer_operation() -> dict[str, Any]:
    """The inference routes' body (their `name` parameter is completed by `install`)."""
    return _body("InferRequest")


def feedback_operation() -> dict[str, Any]:
    item = {"$ref": REF.format(model="FeedbackItem")}
    return _body({"oneOf": [item, {"type": "array", "items": item, "minItems": 1},
                            {"type": "object", "properties": {"labels": {"type": "array", "items": item,
                                                                          "minItems": 1}},
                             "required": ["labels"], "additionalProperties": False}]}) | {"security": [{"bearer": []}]}


def audit_operation() -> dict[str, Any]:
    from telemetry.recorder import AUDIT_KINDS, AUDIT_MAX_LIMIT

    return {"parameters": [
        {"name": "kind", "in": "query", "required": False,
         "schema": {"type": "string", "enum": list(AUDIT_KINDS), "default": "systemic"}},
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": AUDIT_MAX_LIMIT, "default": 100}},
    ], "security": [{"bearer": []}]}


def outcomes_operation() -> dict[str, Any]:
    body = {"type": "object", "required": ["outcomes"], "additionalProperties": False,
            "properties": {"outcomes": {"type": "array", "minItems": 1,
                                        "items": {"$ref": REF.format(model="OutcomeRecord")}}}}
    return _body(body) | {"security": [{"bearer": []}]}


def install(app: FastAPI, models: list[str]) -> None:
    """Make `app.openapi()` include the body models, the bearer scheme, and the served model
    names as the values of every `name` path parameter."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                              description="ecoserve: the Open Inference Protocol (REST) with outcome recording, "
                                          "the feedback API and Prometheus metrics")
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in (InferRequest, FeedbackItem, OutcomeRecord):
                js = model.model_json_schema(ref_template=REF)
                schemas.update(js.pop("$defs", {}))
                schemas[model.__name__] = js
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in doc["paths"].items():
                for op in ops.values():
                    for param in op.get("parameters", []):
                        if path.startswith("/v2/models/") and param["name"] == "name":
                            param["schema"] = {"type": "string", "enum": models}
                            param["description"] = ("an ecosystem (the policy answers) or ecosystem.member "
                                                    "(one member, called directly)")
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
