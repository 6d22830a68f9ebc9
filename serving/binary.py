"""The Open Inference Protocol's binary tensor data extension (KServe v2 / Triton), both ways.

Transport-free: the HTTP adapter hands in the body and the `Inference-Header-Content-Length`
header, and gets back the bytes to send.

Request: the first `Inference-Header-Content-Length` bytes of the body are the JSON inference
request; the rest is the raw data of every input whose `parameters.binary_data_size` is set, in
the order of the inputs, each `prod(shape) * itemsize` bytes, little-endian (BOOL: one byte per
element). Inputs without it carry JSON `data` as usual, so JSON and binary inputs mix.

Response: an output is sent as binary when the request asks (`parameters.binary_data_output:
true` for every output, or `parameters.binary_data: true` on a requested output). Its JSON keeps
`name`, `datatype` and `shape`, gets `parameters.binary_data_size`, and loses `data`; the raw bytes
follow the JSON in the order of the outputs, and `Inference-Header-Content-Length` is the JSON's
length.

Every malformed body is a `BadRequest` naming what is wrong: a header length that is not a number
or runs past the body, a size that does not match shape x datatype, binary data missing or left
over, `data` and `binary_data_size` on one input.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from serving.errors import BadRequest
from serving.protocol import DATATYPES, InferRequest, checked_datatype

__all__ = ["split_body", "attach_binary_inputs", "binary_outputs", "encode_response", "HEADER_LENGTH"]

HEADER_LENGTH = "inference-header-content-length"


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(the JSON part, the binary part) of a request body."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not text.isdigit():
        raise BadRequest(f"Inference-Header-Content-Length must be a non-negative integer, got {header_length[:40]!r}")
    n = int(text)
    if n > len(body):
        raise BadRequest(f"Inference-Header-Content-Length is {n} but the body has only {len(body)} bytes")
    return body[:n], body[n:]


def attach_binary_inputs(req: InferRequest, tail: bytes) -> None:
    """Decode each binary input's bytes from `tail` into its `data` (a typed numpy array of its
    shape), checking every size; `tail` must be used up exactly."""
    offset = 0
    for inp in req.inputs:
        size = (inp.parameters or {}).get("binary_data_size")
        if size is None:
            continue
        where = f"input {inp.name!r}"
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"{where}: parameters.binary_data_size must be a non-negative integer, got {size!r}")
        if inp.data is not None:
            raise BadRequest(f"{where}: has both 'data' and parameters.binary_data_size; send one")
        dt = checked_datatype(inp)
        dtype = DATATYPES[dt].newbyteorder("<")
        want = math.prod(inp.shape) * dtype.itemsize
        if size != want:
            raise BadRequest(f"{where}: binary_data_size is {size} bytes but shape {inp.shape} of {dt} needs {want}")
        if offset + size > len(tail):
            raise BadRequest(f"{where}: the body holds {len(tail) - offset} bytes of binary data for it, "
                             f"binary_data_size says {size}")
        inp.data = np.frombuffer(tail, dtype=dtype, count=math.prod(inp.shape), offset=offset).reshape(inp.shape)
        offset += size
    if offset != len(tail):
        if offset == 0 and not any((i.parameters or {}).get("binary_data_size") is not None for i in req.inputs):
            raise BadRequest(f"{len(tail)} bytes follow the JSON header, but no input has parameters.binary_data_size")
        raise BadRequest(f"{len(tail) - offset} trailing bytes after the binary data of every input")


def binary_outputs(req: InferRequest) -> set[str] | bool:
    """Which outputs the client wants as binary: True for all, or a set of names."""
    if (req.parameters or {}).get("binary_data_output") is True:
        return True
    return {o.name for o in req.outputs or () if (o.parameters or {}).get("binary_data") is True}


def _as_list(data: Any) -> Any:
    return data.tolist() if isinstance(data, np.ndarray) else data


def encode_response(body: dict[str, Any], binary: set[str] | bool) -> tuple[bytes, int | None]:
    """The response bytes, and the JSON header's length when some output is binary (else None).
    Outputs' `data` may be numpy arrays (the data plane's); they are written as JSON lists or raw
    little-endian bytes."""
    chunks: list[bytes] = []
    outputs = []
    for out in body["outputs"]:
        data = out["data"]
        if binary is True or (binary and out["name"] in binary):
            arr = np.ascontiguousarray(data, dtype=DATATYPES[out["datatype"]].newbyteorder("<"))
            raw = arr.tobytes()
            chunks.append(raw)
            out = {k: v for k, v in out.items() if k != "data"}
            out["parameters"] = {**out.get("parameters", {}), "binary_data_size": len(raw)}
        else:
            out = {**out, "data": _as_list(data)}
        outputs.append(out)
    head = json.dumps({**body, "outputs": outputs}).encode()
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)
