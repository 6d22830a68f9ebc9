"""The gRPC adapter without Ray: every method over the real data plane (ONNX Runtime sessions),
raw and typed tensor contents, the same outcome records as over HTTP, and each bad request's
status code and message (never INTERNAL). Over the wire through Ray Serve: test_serving_e2e.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import inprocess_dataplane

from models.heldout import load_heldout
from serving.auth import Credentials
from serving.grpc_adapter import GrpcService
from serving.proto import grpc_predict_v2_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


class Context:
    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.metadata = list(metadata)

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


@pytest.fixture(scope="module")
def recorded():
    return []


@pytest.fixture(scope="module")
def service(serving_repo, recorded):
    return GrpcService(inprocess_dataplane(serving_repo, recorded.extend))


def call(service, method, request):
    ctx = Context()
    resp = asyncio.run(getattr(service, method)(request, ctx))
    return resp, ctx


def infer_request(model, x, raw=True, **kw) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, **kw)
    t = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if raw:
        req.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    else:
        t.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return req


def output(resp, name):
    i = [o.name for o in resp.outputs].index(name)
    o = resp.outputs[i]
    dtype = {"INT64": "<i8", "FP32": "<f4", "FP64": "<f8"}[o.datatype]
    return np.frombuffer(resp.raw_output_contents[i], dtype=dtype).reshape(list(o.shape))


def onnx(serving_repo, eco, member, x, names):
    sess = ort.InferenceSession(str(serving_repo / f"{eco}/{member}/1/model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(names, {"input": x})


def test_health_and_metadata(service):
    assert call(service, "ServerLive", pb.ServerLiveRequest())[0].live
    assert call(service, "ServerReady", pb.ServerReadyRequest())[0].ready
    assert "ecosystem" in call(service, "ServerMetadata", pb.ServerMetadataRequest())[0].extensions
    assert call(service, "ModelReady", pb.ModelReadyRequest(name="digits"))[0].ready
    meta, ctx = call(service, "ModelMetadata", pb.ModelMetadataRequest(name="credit"))
    assert ctx.code is None and meta.inputs[0].name == "input" and list(meta.inputs[0].shape) == [-1, 27]
    assert [o.name for o in meta.outputs] == ["label", "probabilities"]


@pytest.mark.parametrize("raw", [True, False], ids=["raw_input_contents", "typed contents"])
def test_infer_equals_onnxruntime(service, serving_repo, raw):
    x = load_heldout(serving_repo / "digits").X[:6]
    resp, ctx = call(service, "ModelInfer", infer_request("digits.forest", x, raw=raw, id="g-1"))
    assert ctx.code is None, ctx.details
    labels, probs = onnx(serving_repo, "digits", "forest", x, ["label", "probabilities"])
    assert np.array_equal(output(resp, "label"), labels)
    assert np.array_equal(output(resp, "probabilities"), probs)
    assert json.loads(resp.parameters["request_ids"].string_param) == [f"g-1/{i}" for i in range(6)]


def test_request_ids_subgroups_and_the_recorded_outcomes(service, serving_repo, recorded):
    x = load_heldout(serving_repo / "credit").X[:2]
    req = infer_request("credit", x)
    req.parameters["request_ids"].string_param = json.dumps(["grpc-a", "grpc-b"])
    req.parameters["sex"].string_param = "female"
    req.parameters["subgroups"].string_param = json.dumps([{"age_group": "young"}, {"age_group": "adult"}])
    start = len(recorded)
    resp, ctx = call(service, "ModelInfer", req)
    assert ctx.code is None, ctx.details
    got = recorded[start:]
    assert [o.request_id for o in got] == ["grpc-a", "grpc-b"]
    assert [o.groups for o in got] == [{"sex": "female", "age_group": "young"}, {"sex": "female", "age_group": "adult"}]
    one, _ = call(service, "ModelInfer", infer_request("credit", x[:1], id="grpc-one"))
    assert one.parameters["request_id"].string_param == "grpc-one"
    assert one.parameters["served_member"].string_param in ("logreg", "forest", "gboost", "mlp", "knn")
    assert 0 < one.parameters["propensity"].double_param <= 1


def test_regression_values(service, serving_repo):
    x = load_heldout(serving_repo / "diabetes").X[:3]
    resp, ctx = call(service, "ModelInfer", infer_request("diabetes.ridge", x))
    assert ctx.code is None, ctx.details
    want = onnx(serving_repo, "diabetes", "ridge", x, ["variable"])[0].reshape(-1).astype(np.float64)
    assert np.array_equal(output(resp, "value"), want)


def _bad(kind):
    x = np.zeros((2, 64), np.float32)
    if kind == "unknown model":
        return infer_request("nope", x)
    if kind == "raw size":
        r = infer_request("digits", x)
        r.raw_input_contents[0] = b"\x00" * 12
        return r
    if kind == "raw count":
        r = infer_request("digits", x)
        r.raw_input_contents.append(b"")
        return r
    if kind == "contents count":
        r = infer_request("digits", x, raw=False)
        del r.inputs[0].contents.fp32_contents[-1]
        return r
    if kind == "bad id":
        return infer_request("digits", x, id="a b")
    if kind == "request_ids not JSON":
        r = infer_request("digits", x)
        r.parameters["request_ids"].string_param = "[nope"
        return r
    if kind == "too many rows":
        return infer_request("credit", np.zeros((257, 27), np.float32))
    if kind == "NaN":
        return infer_request("digits", np.full((1, 64), np.nan, np.float32))
    if kind == "BYTES":
        r = pb.ModelInferRequest(model_name="digits")
        r.inputs.add(name="input", datatype="BYTES", shape=[1, 64])
        return r
    if kind == "no member answers":
        return infer_request("dead", x)
    raise AssertionError(kind)


BAD = [
    ("unknown model", grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    ("raw size", grpc.StatusCode.INVALID_ARGUMENT, "binary_data_size is 12 bytes but shape [2, 64] of FP32 needs 512"),
    ("raw count", grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries for 1 inputs"),
    ("contents count", grpc.StatusCode.INVALID_ARGUMENT, "contents.fp32_contents has 127 values but shape [2, 64] needs 128"),
    ("bad id", grpc.StatusCode.INVALID_ARGUMENT, "id: character U+0020 at position 1"),
    ("request_ids not JSON", grpc.StatusCode.INVALID_ARGUMENT, "parameters.request_ids: a JSON list"),
    ("too many rows", grpc.StatusCode.RESOURCE_EXHAUSTED, "257 rows in one request; the limit is 256"),
    ("NaN", grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinity"),
    ("BYTES", grpc.StatusCode.INVALID_ARGUMENT, "datatype 'BYTES' is not accepted"),
    ("no member answers", grpc.StatusCode.UNAVAILABLE, "no member"),
]


@pytest.mark.parametrize("kind, code, message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_their_status_code_and_message(service, kind, code, message):
    resp, ctx = call(service, "ModelInfer", _bad(kind))
    assert ctx.code == code, (ctx.code, ctx.details)
    assert message in ctx.details, ctx.details
    assert not resp.outputs


def test_an_inference_token_is_required_over_grpc_too(serving_repo):
    secured = GrpcService(inprocess_dataplane(serving_repo, lambda _: None), Credentials(inference="s3cret-infer"))
    x = load_heldout(serving_repo / "digits").X[:1]
    for metadata, code in [((), grpc.StatusCode.UNAUTHENTICATED),
                           ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
                           ((("authorization", "Bearer s3cret-infer"),), None)]:
        ctx = Context(metadata)
        asyncio.run(secured.ModelInfer(infer_request("digits.forest", x), ctx))
        assert ctx.code == code, (metadata, ctx.details)
        assert "s3cret" not in ctx.details


def test_the_generated_modules_are_current(tmp_path):
    """The committed pb2 modules are what `make proto` generates from the committed .proto."""
    pytest.importorskip("grpc_tools")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT), f"--python_out={out}",
                        f"--pyi_out={out}", f"--grpc_python_out={out}", "serving/proto/grpc_predict_v2.proto"],
                       check=True, cwd=ROOT)
        for name in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"):
            fresh = (Path(out) / "serving" / "proto" / name).read_text()
            assert (ROOT / "serving" / "proto" / name).read_text() == fresh, f"{name} is stale: run `make proto`"
