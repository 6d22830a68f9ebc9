"""The API fuzzed against its own OpenAPI document (`GET /openapi.json`, serving.openapi) with
schemathesis: bodies generated from the documented schemas, valid and invalid, for every
operation. No answer may be a server error, every status must be one the document lists, and
every refusal says what was wrong. The real HTTP app over real ONNX Runtime sessions and a real
recorder (SQLite), without Ray; tokens configured, so the label routes are fuzzed behind auth."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import serving_args
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.core import NOT_SET

from models.runtime import load_member
from serving.config import parse_serving
from serving.dataplane import Dataplane
from serving.http import build_http_app
from serving.members import LocalMember
from serving.recording.host import LocalTelemetry, RecorderHost, recorder_specs

TOKEN = "fuzz-token-0e5b"
EXAMPLES = 60  # per operation; each example is a real request through the app


@pytest.fixture(scope="module")
def app(serving_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    mp = pytest.MonkeyPatch()
    mp.setenv("FUZZ_TOKEN", TOKEN)
    args = serving_args(serving_repo)
    args["ecosystems"] = {k: v for k, v in args["ecosystems"].items() if k in ("digits", "credit", "diabetes")}
    args["telemetry"] = {"store_url": f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'o.db'}"}
    args["auth"] = {"feedback_token_env": "FUZZ_TOKEN"}
    cfg = parse_serving(args)
    host = RecorderHost(recorder_specs(cfg), cfg.telemetry.model_dump(mode="json"))
    dataplane = Dataplane.build(cfg, lambda d, m, s: LocalMember(load_member(d, m, s, "cpu")),
                                sink=lambda o: host.record(o, "t", {}))
    yield build_http_app(dataplane, LocalTelemetry(host), cfg.auth.credentials())
    host.close()
    mp.undo()


@pytest.fixture(scope="module")
def api(app: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_document_describes_every_route_and_body(app: Any) -> None:
    doc = app.openapi()
    paths = doc["paths"]
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer", "/v2/feedback",
                 "/v2/outcomes", "/v2/health/ready", "/v2/health/live", "/v2/health/telemetry", "/metrics"):
        assert path in paths, path
    for path in ("/v2/models/{name}/infer", "/v2/feedback", "/v2/outcomes"):
        assert "requestBody" in paths[path]["post"], path
    names = paths["/v2/models/{name}/infer"]["post"]["parameters"][0]["schema"]["enum"]
    assert "digits" in names and "credit.knn" in names and "dead" not in names
    assert set(doc["components"]["schemas"]) >= {"InferRequest", "InferInput", "FeedbackItem", "OutcomeRecord",
                                                   "ErrorBody"}
    assert paths["/v2/feedback"]["post"]["security"] == [{"bearer": []}]


def _check(app: Any, doc: dict[str, Any], case: Any, counts: dict[int, int]) -> None:
    """Send the generated request to the app over ASGI (httpx), and judge the answer."""
    headers = {k: str(v) for k, v in (case.headers or {}).items()}
    if case.method.upper() == "POST" and case.path in ("/v2/feedback", "/v2/outcomes") and sum(counts.values()) % 4:
        # three requests in four with the right token (the others: whatever was generated, if anything)
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        headers["authorization"] = f"Bearer {TOKEN}"
    content = None
    if case.body is not NOT_SET:
        content = json.dumps(case.body, allow_nan=True).encode() if not isinstance(case.body, bytes) else case.body
        headers.setdefault("content-type", case.media_type or "application/json")

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(case.method, case.formatted_path, params=case.query or None, content=content,
                                   headers=headers)

    response = asyncio.run(go())
    counts[response.status_code] = counts.get(response.status_code, 0) + 1
    where = (case.method, case.formatted_path, response.status_code, response.text[:300])
    assert response.status_code < 500 or response.status_code == 503, where
    if response.status_code >= 400:
        assert response.json()["error"], where
    documented = doc["paths"][case.path][case.method.lower()]["responses"]
    assert str(response.status_code) in documented, (where, sorted(documented))


def _fuzz(app: Any, doc: dict[str, Any], op: Any, mode: GenerationMode, counts: dict[int, int]) -> None:
    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: Any) -> None:
        _check(app, doc, case, counts)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_and_every_status_documented(app: Any, api: Any, mode: GenerationMode) -> None:
    """Every operation of the document, EXAMPLES bodies each (valid ones, and invalid ones that
    break the schema on purpose)."""
    seen: dict[str, dict[int, int]] = {}
    doc = app.openapi()
    for result in api.get_all_operations():
        op = result.ok()
        spec = doc["paths"][op.path][op.method.lower()]
        if mode is GenerationMode.NEGATIVE and "requestBody" not in spec and not spec.get("parameters"):
            continue  # nothing to break in a request without a body or parameters
        seen[f"{op.method.upper()} {op.path}"] = counts = {}
        _fuzz(app, doc, op, mode, counts)
    assert "POST /v2/feedback" in seen and "POST /v2/models/{name}/infer" in seen
    assert all(sum(c.values()) >= 1 for c in seen.values()), seen
    for route in ("POST /v2/feedback", "POST /v2/outcomes"):  # the bodies reached validation, not just auth
        assert set(seen[route]) - {401}, seen[route]
    # (a body valid by the schema is still checked against the model's own input names and shapes,
    # which JSON Schema cannot relate to the path: tests/test_hostile_input.py mutates valid bodies)
