"""Request cases shared by the in-process (ASGI) and the Ray Serve (HTTP) serving tests."""

from __future__ import annotations

import json

import numpy as np

DIGITS_ROW = 64


def infer_body(x: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}


# (description, model, raw body or dict, expected status, expected message fragment)
BAD_REQUESTS = [
    ("wrong tensor name", "digits", {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]},
     400, "unknown input tensor 'x'; the model's input is 'input'"),
    ("wrong row shape", "digits", {"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0] * 63}]},
     400, "shape [1, 63] does not match the model's [-1, 64]"),
    ("wrong rank", "digits", {"inputs": [{"name": "input", "shape": [64], "datatype": "FP32", "data": [0] * 64}]},
     400, "shape [64] does not match"),
    ("data length vs shape", "digits", {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [0] * 64}]},
     400, "data has 64 elements but shape [2, 64] needs 128"),
    ("non-numeric data", "digits", {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ["a"] * 64}]},
     400, "data must hold only numbers (found 'a')"),
    ("null in data", "digits", {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [None] * 64}]},
     400, "data must hold only numbers"),
    ("ragged nested data", "digits", {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [[0] * 64, [0] * 3]}]},
     400, "not a rectangular array"),
    ("BYTES datatype", "digits", {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "BYTES", "data": [0] * 64}]},
     400, "datatype BYTES is not accepted; expected FP32"),
    ("unknown datatype", "digits", {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP128", "data": [0] * 64}]},
     400, "unknown datatype 'FP128'"),
    ("NaN via huge number", "digits", '{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [' + ",".join(["1e999"] * 64) + "]}]}",
     400, "NaN or infinity"),
    ("two inputs", "digits", {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}] * 2},
     400, "expected exactly one input tensor"),
    ("no inputs", "digits", {"inputs": []}, 400, "inputs"),
    ("not JSON", "digits", "{nope", 400, "not valid JSON"),
    ("empty body", "digits", "", 400, "body is empty"),
    ("JSON but not an object", "digits", "[1, 2]", 400, "invalid inference request"),
    ("empty batch", "digits", {"inputs": [{"name": "input", "shape": [0, 64], "datatype": "FP32", "data": []}]},
     400, "the batch is empty"),
    ("unknown output", "digits", {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}],
                                  "outputs": [{"name": "logits"}]}, 400, "unknown output 'logits'"),
    ("bad request_ids", "digits", {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [0] * 128}],
                                   "parameters": {"request_ids": ["a"]}}, 400, "request_ids must be a list of 2"),
    ("unknown model", "nope", {"inputs": []}, 404, "unknown model 'nope'"),
    ("unknown member", "digits.zz", {"inputs": []}, 404, "ecosystem 'digits' has members"),
    ("too many rows", "digits", {"inputs": [{"name": "input", "shape": [300, 1], "datatype": "FP32", "data": [0] * 300}]},
     400, "shape [300, 1] does not match"),
    ("too many rows (right shape)", "credit", {"inputs": [{"name": "input", "shape": [257, 27], "datatype": "FP32", "data": [0] * (257 * 27)}]},
     413, "257 rows in one request; the limit is 256"),
    ("body too large", "digits", "x" * 250_000, 413, "over the limit of 200000 bytes"),
]


def encode(body) -> bytes:
    return body.encode() if isinstance(body, str) else json.dumps(body).encode()
