"""The data plane and REST adapter without Ray: every bad input, faults, fallbacks, metadata.

Members are `LocalMember`s (real ONNX Runtime sessions, no batching); the FastAPI
app is called over ASGI. The same cases run against the real Ray Serve app in
test_serving_e2e.py.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import inprocess_dataplane
from serving_cases import BAD_REQUESTS, encode, infer_body

from models.heldout import load_heldout
from serving.http import build_http_app


@pytest.fixture(scope="module")
def recorded():
    return []


@pytest.fixture(scope="module")
def app(serving_repo, recorded):
    return build_http_app(inprocess_dataplane(serving_repo, recorded.extend))


def call(app, method, path, body=None, headers=None):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            content = encode(body) if body is not None else None
            return await c.request(method, path, content=content, headers=headers)

    return asyncio.run(go())


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_a_clear_4xx(app, case):
    _, model, body, status, message = case
    r = call(app, "POST", f"/v2/models/{model}/infer", body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_outputs_equal_onnxruntime_directly(app, serving_repo, recorded):
    held = load_heldout(serving_repo / "digits")
    x = held.X[:20]
    r = call(app, "POST", "/v2/models/digits/infer", infer_body(x, id="req-1"))
    assert r.status_code == 200
    body = r.json()
    sess = ort.InferenceSession(str(serving_repo / "digits/mlp_a/1/model.onnx"), providers=["CPUExecutionProvider"])
    want_labels, want_probs = sess.run(["label", "probabilities"], {"input": x})
    out = {o["name"]: o for o in body["outputs"]}
    assert out["label"]["data"] == want_labels.tolist()
    assert np.allclose(np.array(out["probabilities"]["data"]).reshape(20, 10), want_probs, atol=1e-6)
    assert body["id"] == "req-1" and body["parameters"]["request_ids"] == [f"req-1/{i}" for i in range(20)]
    assert body["parameters"]["served_members"] == ["mlp_a"] * 20
    assert body["parameters"]["propensities"] == [1.0] * 20
    # every member's output was recorded, and equals the member run directly
    mine = [o for o in recorded if o.request_id.startswith("req-1/")]
    assert len(mine) == 20
    for a, name in enumerate(mine[0].members):
        s = ort.InferenceSession(str(serving_repo / f"digits/{name}/1/model.onnx"), providers=["CPUExecutionProvider"])
        labels, probs = s.run(["label", "probabilities"], {"input": x})
        assert [o.predictions[a] for o in mine] == labels.tolist()
        # and its score for the class it predicted (what label-free estimates calibrate), to the
        # 4 significant digits the store keeps
        assert np.allclose([o.scores[a] for o in mine], probs[np.arange(20), labels], rtol=5.001e-4, atol=0), name


def test_direct_member_request_and_header_id(app, serving_repo, recorded):
    x = load_heldout(serving_repo / "digits").X[:1]
    r = call(app, "POST", "/v2/models/digits.knn/infer", infer_body(x), headers={"x-request-id": "hdr-7"})
    assert r.status_code == 200
    p = r.json()["parameters"]
    assert p["request_id"] == "hdr-7" and p["served_member"] == "knn" and p["propensity"] == 1.0
    assert r.headers["x-request-id"] == "hdr-7"
    rec = [o for o in recorded if o.request_id == "hdr-7"][0]
    assert rec.direct and -1 not in rec.predictions  # shadows still ran


def test_failing_and_hanging_shadows_do_not_change_the_answer(app, serving_repo, recorded):
    x = load_heldout(serving_repo / "digits").X[:5]
    good = call(app, "POST", "/v2/models/digits/infer", infer_body(x)).json()
    bad = call(app, "POST", "/v2/models/faulty/infer", infer_body(x, id="faulty-1"))
    assert bad.status_code == 200
    assert bad.json()["outputs"] == good["outputs"]
    rec = [o for o in recorded if o.request_id.startswith("faulty-1/")]
    knn, forest = rec[0].members.index("knn"), rec[0].members.index("forest")
    assert all(o.predictions[knn] == -1 and o.predictions[forest] == -1 for o in rec)
    assert all(o.predictions[rec[0].members.index("logreg")] >= 0 for o in rec)


def test_failed_served_member_falls_back_and_is_recorded(app, serving_repo, recorded):
    x = load_heldout(serving_repo / "digits").X[:3]
    r = call(app, "POST", "/v2/models/broken/infer", infer_body(x, id="broken-1"))
    assert r.status_code == 200
    p = r.json()["parameters"]
    assert p["fallback"] == [True] * 3
    assert p["served_members"] == ["logreg"] * 3  # first member in the fallback order
    rec = [o for o in recorded if o.request_id.startswith("broken-1/")]
    assert all(o.fallback and o.members[o.intended] == "knn" for o in rec)


def test_no_member_can_answer_is_503_with_reasons(app, serving_repo):
    x = load_heldout(serving_repo / "digits").X[:1]
    r = call(app, "POST", "/v2/models/dead/infer", infer_body(x))
    assert r.status_code == 503
    assert "no member of 'dead' could answer" in r.json()["error"] and "injected fault" in r.json()["error"]
    r = call(app, "POST", "/v2/models/dead.knn/infer", infer_body(x))
    assert r.status_code == 503 and "member knn failed" in r.json()["error"]


def test_metadata_health_and_versions(app):
    assert call(app, "GET", "/v2/health/live").json() == {"live": True}
    assert call(app, "GET", "/v2/health/ready").json() == {"ready": True}
    assert call(app, "GET", "/v2").json()["name"] == "ecoserve"
    meta = call(app, "GET", "/v2/models/digits").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {m["name"] for m in meta["parameters"]["members"]} >= {"logreg", "mlp_a", "mlp_a_int8"}
    assert all(m["provider"] == "CPUExecutionProvider" for m in meta["parameters"]["members"])
    v = meta["versions"][0]
    assert call(app, "GET", f"/v2/models/digits/versions/{v}").status_code == 200
    assert call(app, "GET", "/v2/models/digits/versions/999").status_code == 404
    member = call(app, "GET", "/v2/models/digits.mlp_a_int8").json()
    assert member["platform"] == "onnxruntime_onnx" and member["versions"] == ["1"]
    assert call(app, "GET", "/v2/models/digits.mlp_a/versions/1/ready").json()["ready"] is True
    assert call(app, "GET", "/v2/models/credit/ready").json() == {"name": "credit", "ready": True}
    assert call(app, "GET", "/nothing/here").status_code == 404


def test_subgroups_and_client_row_ids_are_recorded(app, serving_repo, recorded):
    held = load_heldout(serving_repo / "credit")
    x = held.X[:2]
    body = infer_body(x, parameters={"request_ids": ["c-a", "c-b"], "sex": "female",
                                     "subgroups": [{"age_group": "young"}, {"age_group": "adult"}]})
    r = call(app, "POST", "/v2/models/credit/infer", body)
    assert r.status_code == 200
    p = r.json()["parameters"]
    assert p["request_ids"] == ["c-a", "c-b"]
    assert all(0 < q <= 1 for q in p["propensities"])
    rec = {o.request_id: o for o in recorded if o.request_id in ("c-a", "c-b")}
    assert rec["c-a"].groups == {"sex": "female", "age_group": "young"}
    assert rec["c-b"].groups == {"sex": "female", "age_group": "adult"}


def test_regression_ecosystem_serves_values_and_records_every_member(app, serving_repo, recorded):
    x = load_heldout(serving_repo / "diabetes").X[:6]
    r = call(app, "POST", "/v2/models/diabetes/infer", infer_body(x, id="reg-1"))
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    ridge = ort.InferenceSession(str(serving_repo / "diabetes/ridge/1/model.onnx"), providers=["CPUExecutionProvider"])
    want = ridge.run(["variable"], {"input": x})[0].reshape(-1)
    assert out["name"] == "value" and out["datatype"] == "FP64" and out["shape"] == [6]
    assert out["data"] == want.astype(np.float64).tolist()
    rec = [o for o in recorded if o.request_id.startswith("reg-1/")]
    knn = rec[0].members.index("knn")
    assert all(o.predictions[knn] is None for o in rec)  # the failing shadow: a missing value, not a number
    for a, name in enumerate(rec[0].members):
        if a == knn:
            continue
        s = ort.InferenceSession(str(serving_repo / f"diabetes/{name}/1/model.onnx"), providers=["CPUExecutionProvider"])
        assert [o.predictions[a] for o in rec] == s.run(["variable"], {"input": x})[0].reshape(-1).tolist()
    meta = call(app, "GET", "/v2/models/diabetes").json()
    assert meta["outputs"] == [{"name": "value", "datatype": "FP64", "shape": [-1]}]
    assert meta["parameters"]["task"] == "regression" and "classes" not in meta["parameters"]
    assert meta["parameters"]["regression"] == {"tolerance": 40.0, "range": [0.0, 400.0], "bin_width": 40.0, "bins": 10}
    r = call(app, "POST", "/v2/models/diabetes/infer", {**infer_body(x), "outputs": [{"name": "label"}]})
    assert r.status_code == 400 and "unknown output 'label'; outputs: value" in r.json()["error"]


def test_generated_request_ids_are_time_ordered_uuid7():
    import uuid

    from serving.protocol import new_request_ids

    ids = [i for _ in range(300) for i in new_request_ids(37)]  # > 4,096 in a few ms: the counter rolls over
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # strictly increasing: B-tree appends in the store
    for i in ids[:50] + ids[-50:]:
        u = uuid.UUID(hex=i)
        assert len(i) == 32 and u.version == 7 and u.variant == uuid.RFC_4122
    ms = int(ids[-1][:12], 16)
    import time

    assert abs(ms - time.time() * 1000) < 60_000
