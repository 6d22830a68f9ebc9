"""The binary tensor data extension through the real HTTP app (in process, ASGI): tritonclient's
own encoder and decoder, every datatype the demo members use, mixed JSON and binary, outcomes
the same whichever way a request came, and every malformed body a 400 naming what is wrong.
The same client against the real Ray Serve app: test_serving_e2e.py."""

from __future__ import annotations

import asyncio
import json
import struct

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as tc
from conftest import inprocess_dataplane
from serving_cases import infer_body

from models.heldout import load_heldout
from serving.binary import attach_binary_inputs, encode_response, split_body
from serving.errors import BadRequest
from serving.http import build_http_app
from serving.protocol import parse_infer_request


@pytest.fixture(scope="module")
def recorded():
    return []


@pytest.fixture(scope="module")
def app(serving_repo, recorded):
    return build_http_app(inprocess_dataplane(serving_repo, recorded.extend))


def post(app, path, content: bytes, headers=None) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(path, content=content, headers=headers)

    return asyncio.run(go())


def triton_call(app, model, inputs, outputs=None, **kw):
    """One inference the way tritonclient.http sends it (its own body encoder), decoded by its own
    response parser."""
    body, json_size = tc.InferenceServerClient.generate_request_body(inputs, outputs, **kw)
    headers = {"Inference-Header-Content-Length": str(json_size)} if json_size is not None else {}
    r = post(app, f"/v2/models/{model}/infer", body, headers)
    assert r.status_code == 200, r.text
    length = r.headers.get("inference-header-content-length")
    return r, tc.InferenceServerClient.parse_response_body(r.content, header_length=int(length) if length else None)


def onnx(serving_repo, eco, member, x, names):
    sess = ort.InferenceSession(str(serving_repo / f"{eco}/{member}/1/model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(names, {"input": x})


def test_tritonclient_defaults_binary_both_ways(app, serving_repo):
    x = load_heldout(serving_repo / "digits").X[:8]
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary_data=True: tritonclient's default
    r, res = triton_call(app, "digits.logreg", [inp], request_id="bin-1")  # no outputs: binary_data_output
    assert r.headers["content-type"] == "application/octet-stream"
    head = json.loads(r.content[: int(r.headers["inference-header-content-length"])])
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in head["outputs"])
    labels, probs = onnx(serving_repo, "digits", "logreg", x, ["label", "probabilities"])
    assert np.array_equal(res.as_numpy("label"), labels)
    assert res.as_numpy("label").dtype == np.int64
    assert np.array_equal(res.as_numpy("probabilities"), probs)  # raw float32 bytes: exact
    assert res.get_response()["parameters"]["request_ids"] == [f"bin-1/{i}" for i in range(8)]


@pytest.mark.parametrize("in_binary, out_binary", [(True, False), (False, True), (False, False)])
def test_binary_one_way_and_json_the_other(app, serving_repo, in_binary, out_binary):
    x = load_heldout(serving_repo / "credit").X[:5]
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=in_binary)
    outs = [tc.InferRequestedOutput("label", binary_data=out_binary),
            tc.InferRequestedOutput("probabilities", binary_data=False)]
    r, res = triton_call(app, "credit.gboost", [inp], outs)
    assert ("inference-header-content-length" in r.headers) == out_binary
    assert np.array_equal(res.as_numpy("label"), onnx(serving_repo, "credit", "gboost", x, ["label"])[0])
    assert res.get_response()["outputs"][1]["data"]  # probabilities stayed JSON


@pytest.mark.parametrize("datatype", ["FP64", "FP16", "INT32", "INT64"])
def test_every_input_datatype_in_binary(app, serving_repo, datatype):
    """A float model takes any numeric datatype (as JSON does); integers as whole numbers."""
    x = np.round(load_heldout(serving_repo / "digits").X[:3])
    np_type = {"FP64": np.float64, "FP16": np.float16, "INT32": np.int32, "INT64": np.int64}[datatype]
    inp = tc.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x.astype(np_type))
    _, res = triton_call(app, "digits.knn", [inp])
    assert np.array_equal(res.as_numpy("label"), onnx(serving_repo, "digits", "knn", x.astype(np.float32), ["label"])[0])


def test_regression_values_come_back_as_fp64_bytes(app, serving_repo):
    x = load_heldout(serving_repo / "diabetes").X[:4]
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    _, res = triton_call(app, "diabetes.ridge", [inp])
    value = res.as_numpy("value")
    assert value.dtype == np.float64
    want = onnx(serving_repo, "diabetes", "ridge", x, ["variable"])[0].reshape(-1).astype(np.float64)
    assert np.array_equal(value, want)


def test_the_outcomes_recorded_are_the_same_whichever_way_a_request_came(app, serving_repo, recorded):
    x = load_heldout(serving_repo / "credit").X[:6]
    start = len(recorded)
    r = post(app, "/v2/models/credit/infer", json.dumps(infer_body(x, id="same-json")).encode())
    assert r.status_code == 200
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    triton_call(app, "credit", [inp], request_id="same-bin")
    by_path = [recorded[start : start + 6], recorded[start + 6 : start + 12]]
    assert [o.request_id for o in by_path[1]] == [f"same-bin/{i}" for i in range(6)]
    for a, b in zip(*by_path):
        assert a.predictions == b.predictions and a.input_fingerprint == b.input_fingerprint


def _binary_request(x: np.ndarray, extra_inputs=(), header_delta=0, trailing=b"", size=None, datatype="FP32"):
    raw = x.astype(np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": datatype,
                                   "parameters": {"binary_data_size": len(raw) if size is None else size}},
                                  *extra_inputs]}).encode()
    return head + raw + trailing, {"Inference-Header-Content-Length": str(len(head) + header_delta)}


BAD_BINARY = [
    ("header length not a number", lambda x: (b"{}", {"Inference-Header-Content-Length": "12a"}),
     "Inference-Header-Content-Length must be a non-negative integer"),
    ("header length past the body", lambda x: _binary_request(x, header_delta=10_000),
     "Inference-Header-Content-Length is"),
    ("header length cuts the JSON", lambda x: _binary_request(x, header_delta=-5), "not valid JSON"),
    ("size does not match shape x datatype", lambda x: _binary_request(x, size=100),
     "binary_data_size is 100 bytes but shape [2, 64] of FP32 needs 512"),
    ("trailing bytes", lambda x: _binary_request(x, trailing=b"\x00" * 7), "7 trailing bytes"),
    ("binary data missing", lambda x: (lambda b, h: (b[:-8], h))(*_binary_request(x)),
     "the body holds 504 bytes of binary data for it, binary_data_size says 512"),
    ("BYTES", lambda x: _binary_request(x, datatype="BYTES"), "datatype BYTES is not accepted"),
    ("negative size", lambda x: _binary_request(x, size=-4), "binary_data_size must be a non-negative integer"),
    ("bytes but no binary input", lambda x: (json.dumps(infer_body(x)).encode() + b"xyz",
                                             {"Inference-Header-Content-Length": str(len(json.dumps(infer_body(x))))}),
     "3 bytes follow the JSON header, but no input has parameters.binary_data_size"),
]


@pytest.mark.parametrize("case", BAD_BINARY, ids=[c[0] for c in BAD_BINARY])
def test_bad_binary_bodies_get_a_400_naming_what_is_wrong(app, serving_repo, case, recorded):
    _, make, message = case
    before = len(recorded)
    content, headers = make(load_heldout(serving_repo / "digits").X[:2])
    r = post(app, "/v2/models/digits/infer", content, headers)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"], r.json()
    assert len(recorded) == before


def test_data_and_binary_size_on_one_input_is_refused():
    req = parse_infer_request({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1.0],
                                           "parameters": {"binary_data_size": 4}}]})
    with pytest.raises(BadRequest, match="has both 'data' and parameters.binary_data_size"):
        attach_binary_inputs(req, struct.pack("<f", 1.0))


def test_json_and_binary_inputs_mix_in_one_request():
    req = parse_infer_request({"inputs": [
        {"name": "a", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": 8}},
        {"name": "b", "shape": [1], "datatype": "FP32", "data": [0.5]},
        {"name": "c", "shape": [1, 2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}},
    ]})
    attach_binary_inputs(req, struct.pack("<ii", 7, -3) + b"\x01\x00")
    assert req.inputs[0].data.tolist() == [7, -3]
    assert req.inputs[1].data == [0.5]
    assert req.inputs[2].data.tolist() == [[True, False]]


def test_the_codec_round_trips_every_output_datatype():
    body = {"outputs": [
        {"name": "label", "datatype": "INT64", "shape": [2], "data": np.array([3, -1])},
        {"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": np.array([0.25, 0.75], np.float32)},
        {"name": "value", "datatype": "FP64", "shape": [1], "data": np.array([1e300])},
    ]}
    content, n = encode_response(body, True)
    assert n is not None
    head, tail = split_body(content, str(n))
    outs = json.loads(head)["outputs"]
    assert [o["parameters"]["binary_data_size"] for o in outs] == [16, 8, 8]
    assert struct.unpack("<qqffd", tail) == (3, -1, 0.25, 0.75, 1e300)
    plain, none = encode_response(body, set())
    assert none is None and json.loads(plain)["outputs"][2]["data"] == [1e300]
