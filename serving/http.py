"""The REST adapter: Open Inference Protocol routes over the data plane.

Routes parse, validate, delegate, and turn the result back into JSON. One
exception handler maps `EcoserveError` to its status (`serving.errors`); bodies
are size-checked before parsing; malformed JSON is a 400, never a 500. The same
app runs inside the Ray Serve gateway and, in tests, under plain ASGI.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from serving import openapi
from serving.auth import Credentials, authorize_inference, authorize_labels, check_scope
from serving.binary import HEADER_LENGTH, attach_binary_inputs, binary_outputs, encode_response, split_body
from serving.dataplane import Dataplane
from serving.errors import BadRequest, EcoserveError, NotFound, PayloadTooLarge, UnprocessableEntity, status_of
from serving.feedback import parse_feedback
from serving.outcomes_api import parse_outcomes
from serving.protocol import parse_infer_request
from telemetry.recorder import AUDIT_KINDS, AUDIT_MAX_LIMIT, LabelItem
from telemetry.records import outcome_fields

__all__ = ["build_http_app", "read_body", "read_json_body", "TelemetryBackend", "PROMETHEUS_CONTENT_TYPE"]

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class TelemetryBackend(Protocol):
    """Where feedback goes and /metrics comes from: the recorder (in-process or a deployment)."""

    async def feedback(self, items: list[LabelItem], scope: frozenset[str] | None = None) -> dict[str, Any]: ...

    async def outcomes(self, items: list[tuple[Any, ...]]) -> dict[str, Any]: ...

    async def audit(self, ecosystem: str, kind: str, limit: int) -> dict[str, Any]: ...

    async def metrics(self) -> bytes: ...

log = logging.getLogger(__name__)


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"request body is over the limit of {max_bytes} bytes")
    if not body:
        raise BadRequest("the request body is empty; expected a JSON object")
    return bytes(body)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """A JSON body (the feedback API: the binary extension is for tensors)."""
    if request.headers.get(HEADER_LENGTH) is not None:
        raise BadRequest("Inference-Header-Content-Length: binary data is only accepted by the inference routes")
    return parse_json(await read_body(request, max_bytes))


def build_http_app(
    dataplane: Dataplane, telemetry: TelemetryBackend | None = None, credentials: Credentials | None = None,
    recording_health: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    creds = credentials or Credentials()
    app = FastAPI(title="ecoserve", version="0.1.0", docs_url=None, redoc_url=None)
    max_bytes = dataplane.cfg.limits.max_body_bytes
    max_items = dataplane.cfg.telemetry.max_feedback_items

    @app.exception_handler(EcoserveError)
    async def _ecoserve_error(_: Request, exc: EcoserveError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        e = exc.errors()[0]
        return JSONResponse({"error": f"{'.'.join(map(str, e['loc']))}: {e['msg']}"}, status_code=400)

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, Any]:
        # ready while the members can answer, whatever the store does: taking replicas out of
        # service would turn a telemetry outage into an inference outage (docs/reliability.md).
        # `telemetry` says how recording fares; its own probe is /v2/health/telemetry
        body: dict[str, Any] = {"ready": True}
        if recording_health is not None:
            body["telemetry"] = recording_health()
        return body

    @app.get("/v2/health/telemetry", responses=openapi.errors(404, 503))
    async def telemetry_health() -> Response:
        """200 while outcomes are being stored, 503 while they wait (store or recorder away)."""
        if recording_health is None:
            raise NotFound("telemetry is disabled in this deployment")
        health = recording_health()
        return JSONResponse(health, status_code=200 if health["healthy"] else 503)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return dataplane.server_metadata()

    @app.get("/v2/models/{name}", responses=openapi.errors(404))
    async def model_metadata(name: str) -> dict[str, Any]:
        return dataplane.model_metadata(dataplane.resolve(name))

    @app.get("/v2/models/{name}/versions/{version}", responses=openapi.errors(404))
    async def model_version_metadata(name: str, version: str) -> dict[str, Any]:
        return dataplane.model_metadata(dataplane.resolve(name, version))

    @app.get("/v2/models/{name}/ready", responses=openapi.errors(404))
    async def model_ready(name: str) -> dict[str, Any]:
        model = dataplane.resolve(name)
        return {"name": model.name, "ready": True}

    @app.get("/v2/models/{name}/versions/{version}/ready", responses=openapi.errors(404))
    async def model_version_ready(name: str, version: str) -> dict[str, Any]:
        model = dataplane.resolve(name, version)
        return {"name": model.name, "ready": True}

    async def _infer(request: Request, name: str, version: str | None) -> Response:
        eco = name.partition(".")[0]
        eco = eco if eco in dataplane.runners else "unknown"  # bounded label values
        try:
            authorize_inference(request.headers.get("authorization"), creds)
            model = dataplane.resolve(name, version)
            head, tail = split_body(await read_body(request, max_bytes), request.headers.get(HEADER_LENGTH))
            req = parse_infer_request(parse_json(head))
            attach_binary_inputs(req, tail)
            result, request_id = await dataplane.infer(model, req, request.headers.get("x-request-id"))
            content, header_length = encode_response(dataplane.response(model, req, result, request_id),
                                                     binary_outputs(req))
        except EcoserveError as exc:
            dataplane.stats.request(eco, status_of(exc))
            raise
        dataplane.stats.request(eco, 200)
        headers = {"x-request-id": request_id}
        if header_length is None:
            return Response(content, media_type="application/json", headers=headers)
        headers["Inference-Header-Content-Length"] = str(header_length)
        return Response(content, media_type="application/octet-stream", headers=headers)

    @app.post("/v2/models/{name}/infer", responses=openapi.ERRORS | openapi.errors(401),
              openapi_extra=openapi.infer_operation())
    async def infer(request: Request, name: str) -> Response:
        return await _infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer", responses=openapi.ERRORS | openapi.errors(401),
              openapi_extra=openapi.infer_operation())
    async def infer_version(request: Request, name: str, version: str) -> Response:
        return await _infer(request, name, version)

    @app.post("/v2/feedback", responses=openapi.errors(400, 401, 403, 404, 413, 422, 503),
              openapi_extra=openapi.feedback_operation())
    async def feedback(request: Request) -> dict[str, Any]:
        if telemetry is None:
            raise NotFound("telemetry is disabled in this deployment: no feedback API")
        scope = authorize_labels(request.headers.get("authorization"), creds)
        # feedback batches are bigger than inference bodies: allow 256 bytes per item on top
        items = parse_feedback(await read_json_body(request, max_bytes + 256 * max_items), max_items)
        return await telemetry.feedback(items, scope)

    @app.post("/v2/outcomes", responses=openapi.errors(400, 401, 403, 404, 413, 422, 503),
              openapi_extra=openapi.outcomes_operation())
    async def outcomes(request: Request) -> dict[str, Any]:
        if telemetry is None:
            raise NotFound("telemetry is disabled in this deployment: no outcomes API")
        scope = authorize_labels(request.headers.get("authorization"), creds)
        # an outcome record is bigger than a label: allow 1 KiB per item on top
        records = parse_outcomes(await read_json_body(request, max_bytes + 1024 * max_items), dataplane.manifests,
                                 max_items, scope)
        return await telemetry.outcomes(list(map(outcome_fields, records)))

    @app.get("/v2/ecosystems/{name}/audit", responses=openapi.errors(401, 403, 404, 422, 503),
             openapi_extra=openapi.audit_operation())
    async def audit(request: Request, name: str) -> dict[str, Any]:
        """The audit lists: the newest outcomes every member got wrong (kind=systemic) or the
        compression-identified exemplars (kind=cie), with each member's output. They name request
        ids, so they take the token that posts labels (and its ecosystems' scope)."""
        if telemetry is None:
            raise NotFound("telemetry is disabled in this deployment: no audit API")
        scope = authorize_labels(request.headers.get("authorization"), creds)
        check_scope(scope, name, "audit")
        kind = request.query_params.get("kind", "systemic")
        raw_limit = request.query_params.get("limit", "100")
        try:
            limit = int(raw_limit)
        except ValueError:
            raise UnprocessableEntity(f"limit: expected an integer, got {raw_limit[:40]!r}") from None
        if not 1 <= limit <= AUDIT_MAX_LIMIT:
            raise UnprocessableEntity(f"limit: expected 1 to {AUDIT_MAX_LIMIT}, got {limit}")
        if kind not in AUDIT_KINDS:
            raise UnprocessableEntity(f"kind: expected one of {', '.join(AUDIT_KINDS)}, got {kind[:40]!r}")
        return await telemetry.audit(name, kind, limit)

    @app.get("/metrics", responses=openapi.errors(404))
    async def metrics() -> Response:
        if telemetry is None:
            raise NotFound("telemetry is disabled in this deployment: no /metrics")
        return Response(await telemetry.metrics(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def not_found(path: str) -> Response:
        raise NotFound(f"no route /{path}")

    openapi.install(app, dataplane.model_names())
    return app
