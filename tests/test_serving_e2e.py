"""The real Ray Serve app (HAProxy ingress, throughput-optimized), over HTTP.

Starts Ray and the app from a Serve config file exactly as `ecoserve serve` does,
on 2 CPUs with fractional resources, and talks to it with httpx and tritonclient.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import served_app, serving_args
from serving_cases import BAD_REQUESTS, encode, infer_body

from models.heldout import load_heldout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(serving_repo, tmp_path_factory):
    """The real app with HTTP and Serve's gRPC ingress."""
    with served_app(serving_args(serving_repo), tmp_path_factory.mktemp("cfg"), grpc=True) as running:
        yield running


@pytest.fixture(scope="module")
def server(app):
    return app.url


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_over_http(server, case):
    _, model, body, status, message = case
    r = httpx.post(f"{server}/v2/models/{model}/infer", content=encode(body), timeout=30)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_tritonclient_metadata_and_infer(server, serving_repo):
    import tritonclient.http as tc

    client = tc.InferenceServerClient(url=server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    meta = client.get_model_metadata("digits")
    assert meta["inputs"][0]["name"] == "input" and meta["inputs"][0]["datatype"] == "FP32"
    x = load_heldout(serving_repo / "digits").X[:8]
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    out = [tc.InferRequestedOutput("label", binary_data=False), tc.InferRequestedOutput("probabilities", binary_data=False)]
    res = client.infer("digits.logreg", [inp], outputs=out, request_id="triton-1")
    sess = ort.InferenceSession(str(serving_repo / "digits/logreg/1/model.onnx"), providers=["CPUExecutionProvider"])
    labels, probs = sess.run(["label", "probabilities"], {"input": x})
    assert np.array_equal(res.as_numpy("label"), labels)
    assert np.allclose(res.as_numpy("probabilities"), probs, atol=1e-6)
    assert res.get_response()["id"] == "triton-1"


def test_tritonclient_defaults_binary_tensors_over_http(server, serving_repo):
    """tritonclient.http with its defaults: binary input data, binary outputs (binary_data_output)."""
    import tritonclient.http as tc

    client = tc.InferenceServerClient(url=server.removeprefix("http://"))
    x = load_heldout(serving_repo / "digits").X[:32]
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("digits", [inp], request_id="triton-bin")
    labels = res.as_numpy("label")
    served = res.get_response()["parameters"]["served_members"]
    assert res.get_response()["parameters"]["request_ids"] == [f"triton-bin/{i}" for i in range(32)]
    for i, member in enumerate(served):
        want = ort.InferenceSession(str(serving_repo / f"digits/{member}/1/model.onnx"),
                                    providers=["CPUExecutionProvider"]).run(["label"], {"input": x[i : i + 1]})[0]
        assert labels[i] == want[0], (i, member)


def test_outputs_equal_onnxruntime_for_every_member(server, serving_repo):
    x = load_heldout(serving_repo / "credit").X[:16]
    for member in ("logreg", "forest", "gboost", "mlp", "knn"):
        r = httpx.post(f"{server}/v2/models/credit.{member}/infer", json=infer_body(x), timeout=30)
        assert r.status_code == 200, r.text
        sess = ort.InferenceSession(str(serving_repo / f"credit/{member}/1/model.onnx"), providers=["CPUExecutionProvider"])
        assert r.json()["outputs"][0]["data"] == sess.run(["label"], {"input": x})[0].tolist(), member


def test_shadow_faults_do_not_change_the_served_answer(server, serving_repo):
    x = load_heldout(serving_repo / "digits").X[:4]
    good = httpx.post(f"{server}/v2/models/digits/infer", json=infer_body(x), timeout=30)
    bad = httpx.post(f"{server}/v2/models/faulty/infer", json=infer_body(x), timeout=30)
    assert good.status_code == bad.status_code == 200
    assert bad.json()["outputs"] == good.json()["outputs"]
    fb = httpx.post(f"{server}/v2/models/broken/infer", json=infer_body(x), timeout=30).json()
    assert fb["parameters"]["fallback"] == [True] * 4
    dead = httpx.post(f"{server}/v2/models/dead/infer", json=infer_body(x), timeout=30)
    assert dead.status_code == 503 and "could answer" in dead.json()["error"]


def test_thompson_served_shares_match_logged_propensities(server, serving_repo):
    x = load_heldout(serving_repo / "credit").X[:50]
    served, pis = [], []
    for _ in range(80):
        p = httpx.post(f"{server}/v2/models/credit/infer", json=infer_body(x), timeout=30).json()["parameters"]
        served += p["served_members"]
        pis += p["propensities"]
    assert all(0 < q <= 1 for q in pis)
    members = ["logreg", "forest", "gboost", "mlp", "knn"]
    # the posterior may move during the test (the recorder's reward totals come back with every
    # hand-over, e.g. labels assumed by the sweep), so test the identity that holds for any
    # sequence of logged policies: E[sum over rows of 1{served = a} / pi_row(a)] = rows, for each a
    n = len(served)
    for m in members:
        q = np.array([pq for sm, pq in zip(served, pis) if sm == m])
        ips = float((1.0 / q).sum())
        # its variance, sum over rows of (1 - pi) / pi, estimated without bias from the served rows
        std = float(np.sqrt(np.sum((1 - q) / q**2)))
        assert q.size and abs(ips - n) < 4.5 * std, (m, ips, n, std)  # ~1e-5 false alarms per member


def test_concurrent_requests_are_batched_correctly(server, serving_repo):
    """Many concurrent single-row calls (dynamically batched together) each get their own row's answer."""
    import asyncio

    x = load_heldout(serving_repo / "digits").X[:64]
    sess = ort.InferenceSession(str(serving_repo / "digits/mlp_a/1/model.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(["label"], {"input": x})[0].tolist()

    async def go():
        async with httpx.AsyncClient(timeout=30) as c:
            rs = await asyncio.gather(*(c.post(f"{server}/v2/models/digits/infer", json=infer_body(x[i : i + 1])) for i in range(64)))
        return [r.json()["outputs"][0]["data"][0] for r in rs]

    assert asyncio.run(go()) == want


def _stub(app):
    import grpc

    from serving.proto import grpc_predict_v2_pb2_grpc as pbg

    channel = grpc.insecure_channel(f"127.0.0.1:{app.grpc_port}")
    return channel, pbg.GRPCInferenceServiceStub(channel)


def test_grpc_over_the_wire_equals_http_and_onnxruntime(app, serving_repo):
    """The KServe v2 gRPC service through Ray Serve's gRPC ingress: health, metadata, and
    inference whose outputs equal onnxruntime's and the HTTP path's for the same rows."""
    from serving.proto import grpc_predict_v2_pb2 as pb

    channel, stub = _stub(app)
    with channel:
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="credit"), timeout=30).ready
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="credit.knn"), timeout=30)
        assert meta.platform == "onnxruntime_onnx" and meta.inputs[0].datatype == "FP32"
        x = load_heldout(serving_repo / "credit").X[:16]
        req = pb.ModelInferRequest(model_name="credit.knn", id="wire-1")
        req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        req.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
        resp = stub.ModelInfer(req, timeout=30)
    labels = np.frombuffer(resp.raw_output_contents[0], dtype="<i8")
    sess = ort.InferenceSession(str(serving_repo / "credit/knn/1/model.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(labels, sess.run(["label"], {"input": x})[0])
    http = httpx.post(f"{app.url}/v2/models/credit.knn/infer", json=infer_body(x, id="wire-2"), timeout=30).json()
    assert http["outputs"][0]["data"] == labels.tolist()
    assert resp.parameters["request_ids"].string_param == '["wire-1/0", "wire-1/1", "wire-1/2", "wire-1/3", ' \
        '"wire-1/4", "wire-1/5", "wire-1/6", "wire-1/7", "wire-1/8", "wire-1/9", "wire-1/10", "wire-1/11", ' \
        '"wire-1/12", "wire-1/13", "wire-1/14", "wire-1/15"]'


@pytest.mark.parametrize("model, rows, code, message", [
    ("nope", 1, "NOT_FOUND", "unknown model 'nope'"),
    ("credit", 300, "RESOURCE_EXHAUSTED", "300 rows in one request; the limit is 256"),
    ("dead", 1, "UNAVAILABLE", "no member"),
    ("credit", 0, "INVALID_ARGUMENT", "the batch is empty"),
])
def test_grpc_errors_are_status_codes(app, model, rows, code, message):
    import grpc

    from serving.proto import grpc_predict_v2_pb2 as pb

    width = 64 if model == "dead" else 27
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="FP32", shape=[rows, width])
    req.raw_input_contents.append(np.zeros((rows, width), "<f4").tobytes())
    channel, stub = _stub(app)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=30)
    assert err.value.code() == getattr(grpc.StatusCode, code), (err.value.code(), err.value.details())
    assert message in err.value.details()


TRITON_GRPC_CLIENT = """
import sys
import numpy as np
import tritonclient.grpc as tg

port, x_file, out_file = sys.argv[1:]
client = tg.InferenceServerClient(url=f"127.0.0.1:{port}")
assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
meta = client.get_model_metadata("digits.logreg")
assert meta.inputs[0].name == "input" and meta.inputs[0].datatype == "FP32", meta
x = np.load(x_file)
inp = tg.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
res = client.infer("digits.logreg", [inp], request_id="tg-1")
np.save(out_file, np.stack([res.as_numpy("label").astype(np.float64), res.as_numpy("probabilities")[:, 0]]))
try:
    client.infer("nope", [inp])
    raise SystemExit("no error for an unknown model")
except tg.InferenceServerException as exc:
    assert "StatusCode.NOT_FOUND" in str(exc.status()) and "unknown model 'nope'" in exc.message(), exc
"""


def test_tritonclient_grpc_from_its_own_environment(app, serving_repo, tmp_path):
    """tritonclient.grpc (which pins protobuf 6) against the app, from the environment `make test`
    gives it: health, metadata, inference equal to onnxruntime's, a status code for an error."""
    import os
    import subprocess

    python = Path(__file__).resolve().parent.parent / ".venv-grpc-client" / "bin" / "python"
    if not python.exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-grpc-client is missing: `make test` creates it")
        pytest.skip(".venv-grpc-client is missing: `make test` creates it")
    x = load_heldout(serving_repo / "digits").X[:8].astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "client.py").write_text(TRITON_GRPC_CLIENT)
    proc = subprocess.run([str(python), str(tmp_path / "client.py"), str(app.grpc_port), str(tmp_path / "x.npy"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = np.load(tmp_path / "out.npy")
    labels, probs = ort.InferenceSession(str(serving_repo / "digits/logreg/1/model.onnx"),
                                         providers=["CPUExecutionProvider"]).run(["label", "probabilities"], {"input": x})
    assert np.array_equal(got[0], labels) and np.array_equal(got[1], probs[:, 0].astype(np.float64))
