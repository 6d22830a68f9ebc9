"""The gRPC adapter: the Open Inference Protocol's `inference.GRPCInferenceService` over the data
plane, as the REST adapter (`serving.http`) does for HTTP. Ray Serve's gRPC ingress calls the
Gateway's methods of the same names (`serving.app`); this module knows nothing of Ray.

Requests become the same `InferRequest` the REST adapter builds, so routing, outcome records,
request ids and every check are the same. Differences the protocol imposes:

- tensor data comes in `raw_input_contents` (raw little-endian bytes, one per input, in order;
  tritonclient.grpc's default) or in each input's typed `contents` (e.g. `fp32_contents`);
- outputs go back in `raw_output_contents`;
- parameters are scalars (`InferParameter`): per-row lists travel as JSON text, i.e.
  `request_ids` and `subgroups` in the request, and `request_ids`, `served_members`,
  `propensities`, `fallback` in the response (a single row also gets `request_id`,
  `served_member` and `propensity` as plain scalars);
- errors are gRPC status codes (`STATUS_CODES`), with the same messages as over HTTP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np

from serving.auth import Credentials, authorize_inference
from serving.binary import attach_binary_inputs
from serving.dataplane import Dataplane
from serving.errors import BadRequest, EcoserveError, status_of
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.protocol import DATATYPES, parse_infer_request

__all__ = ["GrpcService", "STATUS_CODES", "SERVICER_FUNCTION"]

# what a Serve config's `grpc_options.grpc_servicer_functions` names
SERVICER_FUNCTION = "serving.proto.grpc_predict_v2_pb2_grpc:add_GRPCInferenceServiceServicer_to_server"

# HTTP status of an EcoserveError -> gRPC status code (the same meaning, the gRPC way)
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}

T = TypeVar("T")

# typed `contents` field of each datatype
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "FP16": "fp32_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}
_JSON_PARAMETERS = ("request_ids", "subgroups")


class Context(Protocol):
    """What the adapter needs of a gRPC call's context (Serve's `RayServegRPCContext`)."""

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def invocation_metadata(self) -> Any: ...


def _authorization(grpc_context: Context | None) -> str | None:
    """The call's `authorization` metadata (gRPC's lower-case key), if any."""
    if grpc_context is None:
        return None
    for key, value in grpc_context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


def _param_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _set_param(p: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    elif isinstance(value, str):
        p.string_param = value
    else:
        p.string_param = json.dumps(value)


def _parameters(params: Any, where: str) -> dict[str, Any]:
    out = {}
    for key, p in params.items():
        value = _param_value(p)
        if key in _JSON_PARAMETERS and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise BadRequest(f"{where}{key}: a JSON list as string_param expected ({exc.msg})") from exc
        out[key] = value
    return out


def request_body(req: pb.ModelInferRequest) -> tuple[dict[str, Any], bytes]:
    """The JSON-shaped request the data plane parses, and the raw input bytes (for
    `serving.binary.attach_binary_inputs`, which checks each size against shape x datatype)."""
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs")
    inputs = []
    for i, t in enumerate(req.inputs):
        inp: dict[str, Any] = {"name": t.name, "shape": list(t.shape), "datatype": t.datatype,
                               "parameters": _parameters(t.parameters, f"input {t.name!r}: parameters.")}
        if raw:
            if t.HasField("contents"):
                raise BadRequest(f"input {t.name!r}: both raw_input_contents and contents; send one")
            inp["parameters"]["binary_data_size"] = len(raw[i])
        else:
            field = _CONTENTS.get(t.datatype.upper())
            if field is None:
                raise BadRequest(f"input {t.name!r}: datatype {t.datatype!r} is not accepted")
            values = getattr(t.contents, field)
            want = math.prod(t.shape) if t.shape else 0
            if len(values) != want:
                raise BadRequest(f"input {t.name!r}: contents.{field} has {len(values)} values but shape "
                                 f"{list(t.shape)} needs {want}")
            inp["data"] = list(values)
        inputs.append(inp)
    body: dict[str, Any] = {"inputs": inputs, "parameters": _parameters(req.parameters, "parameters.")}
    if req.id:
        body["id"] = req.id
    if req.outputs:
        body["outputs"] = [{"name": o.name} for o in req.outputs]
    return body, b"".join(raw)


def response_proto(body: dict[str, Any]) -> pb.ModelInferResponse:
    """The data plane's response as `ModelInferResponse`, outputs as raw little-endian bytes."""
    resp = pb.ModelInferResponse(model_name=body["model_name"], model_version=body["model_version"], id=body["id"])
    for key, value in body["parameters"].items():
        _set_param(resp.parameters[key], value)
    for out in body["outputs"]:
        arr = np.ascontiguousarray(out["data"], dtype=DATATYPES[out["datatype"]].newbyteorder("<"))
        resp.outputs.add(name=out["name"], datatype=out["datatype"], shape=out["shape"])
        resp.raw_output_contents.append(arr.tobytes())
    return resp


class GrpcService:
    """`inference.GRPCInferenceService` over a data plane. Each method takes the request proto and
    a context, and answers the response proto (an empty one with the status set on error)."""

    def __init__(self, dataplane: Dataplane, credentials: Credentials | None = None) -> None:
        self.dataplane = dataplane
        self.credentials = credentials or Credentials()

    async def ServerLive(self, request: pb.ServerLiveRequest, grpc_context: Context | None = None) -> pb.ServerLiveResponse:  # noqa: N802 - the protocol's names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, grpc_context: Context | None = None) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, grpc_context: Context | None = None) -> pb.ServerMetadataResponse:  # noqa: N802
        meta = self.dataplane.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def ModelReady(self, request: pb.ModelReadyRequest, grpc_context: Context | None = None) -> pb.ModelReadyResponse:  # noqa: N802
        return self._call(lambda: (self.dataplane.resolve(request.name, request.version or None),
                                   pb.ModelReadyResponse(ready=True))[1], pb.ModelReadyResponse, grpc_context)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, grpc_context: Context | None = None) -> pb.ModelMetadataResponse:  # noqa: N802
        def metadata() -> pb.ModelMetadataResponse:
            meta = self.dataplane.model_metadata(self.dataplane.resolve(request.name, request.version or None))
            resp = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
            for kind in ("inputs", "outputs"):
                for t in meta[kind]:
                    getattr(resp, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            return resp

        return self._call(metadata, pb.ModelMetadataResponse, grpc_context)

    async def ModelInfer(self, request: pb.ModelInferRequest, grpc_context: Context | None = None) -> pb.ModelInferResponse:  # noqa: N802
        dp = self.dataplane
        eco = request.model_name.partition(".")[0]
        eco = eco if eco in dp.runners else "unknown"  # bounded label values
        try:
            if self.credentials.inference is not None:
                authorize_inference(_authorization(grpc_context), self.credentials)
            model = dp.resolve(request.model_name, request.model_version or None)
            body, raw = request_body(request)
            req = parse_infer_request(body)
            attach_binary_inputs(req, raw)
            result, request_id = await dp.infer(model, req, None)
            resp = response_proto(dp.response(model, req, result, request_id))
        except EcoserveError as exc:
            dp.stats.request(eco, status_of(exc))
            return _fail(exc, pb.ModelInferResponse, grpc_context)
        dp.stats.request(eco, 200)
        return resp

    @staticmethod
    def _call(fn: Callable[[], T], empty: Callable[[], T], grpc_context: Context | None) -> T:
        try:
            return fn()
        except EcoserveError as exc:
            return _fail(exc, empty, grpc_context)


def _fail(exc: EcoserveError, empty: Callable[[], T], grpc_context: Context | None) -> T:
    if grpc_context is None:
        raise exc
    grpc_context.set_code(STATUS_CODES.get(status_of(exc), grpc.StatusCode.INVALID_ARGUMENT))
    grpc_context.set_details(exc.message)
    return empty()
