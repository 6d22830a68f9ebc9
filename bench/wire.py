"""`python -m bench wire`: the default config served over each wire format, measured in one run
side by side: JSON over HTTP, binary tensors over HTTP, and gRPC (raw contents), at 1 and 32 rows
per request and concurrency 1 and 64, on the digits ecosystem (6 members per request); with the
plain uvicorn + onnxruntime baseline's JSON latency at concurrency 1 as the reference.

One closed-loop Python load generator (asyncio: httpx for HTTP, grpc.aio for gRPC) drives every
cell, so the client's own cost is alike across formats; it shares the machine's cores with the
server. Cells run in rounds that alternate the formats (ABC, CBA, ...), so that drift hits each
format alike. Targets (reported, not gated): binary at 32 rows >= 1.5x JSON's throughput; gRPC's
p50 at concurrency 1 <= binary HTTP's; the fastest format's p50 at concurrency 1 within 1.3x of
the baseline's.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.load import LoadResult, closed_loop
from bench.serving import ecoserve_config, serve_config, start_setup, stop_setup
from ecoserve.server import free_port
from models.heldout import load_heldout

FORMATS = ("json", "binary", "grpc")
POINTS = ((1, 1), (1, 64), (32, 1), (32, 64))
GRPC_SERVICER = "serving.proto.grpc_predict_v2_pb2_grpc:add_GRPCInferenceServiceServicer_to_server"


def _json_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode(), {"content-type": "application/json"}


def _binary_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + raw, {"inference-header-content-length": str(len(head)), "content-type": "application/octet-stream"}


async def _http(url: str, bodies: list[tuple[bytes, dict[str, str]]], concurrency: int, duration_s: float) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        async def send(i: int) -> bool:
            body, headers = bodies[i % len(bodies)]
            r = await client.post(url, content=body, headers=headers)
            return r.status_code == 200

        return await closed_loop(send, concurrency, duration_s)


async def grpc_load(target: str, xs: list[np.ndarray], concurrency: int, duration_s: float,
                    model: str) -> LoadResult:
    """Closed-loop gRPC load (raw contents) of `model` with the given batches."""
    return await _grpc(target, xs, concurrency, duration_s, model)


async def _grpc(target: str, xs: list[np.ndarray], concurrency: int, duration_s: float,
                model: str = "digits") -> LoadResult:
    import grpc

    from serving.proto import grpc_predict_v2_pb2 as pb
    from serving.proto import grpc_predict_v2_pb2_grpc as pbg

    requests = []
    for x in xs:
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        req.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
        requests.append(req)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]  # generated, untyped

        async def send(i: int) -> bool:
            try:
                await stub.ModelInfer(requests[i % len(requests)], timeout=30)
            except grpc.aio.AioRpcError:
                return False
            return True

        return await closed_loop(send, concurrency, duration_s)


def _cell(fmt: str, url: str, grpc_target: str, x: np.ndarray, rows: int, conc: int, duration_s: float) -> LoadResult:
    xs = [x[i : i + rows] for i in range(0, len(x) - rows, rows)][:64]
    if fmt == "grpc":
        return asyncio.run(_grpc(grpc_target, xs, conc, duration_s))
    encode = _json_body if fmt == "json" else _binary_body
    return asyncio.run(_http(f"{url}/v2/models/digits/infer", [encode(c) for c in xs], conc, duration_s))


def _start_default(repo: Path, tmp: Path) -> tuple[Any, str, str]:
    """The default setup (recorder with the gateway) with Serve's gRPC ingress beside HTTP."""
    port, grpc_port = free_port(), free_port()
    cfg = ecoserve_config(repo, port, "colocated", True, tmp, recorder_in_gateway=True)
    cfg["grpc_options"] = {"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}
    proc = serve_config(cfg, tmp / "wire.yaml", {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"})
    return proc, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"


def run(repo: Path) -> Sequence[tuple[str, ...]]:
    duration_s = float(os.environ.get("BENCH_WIRE_SECONDS", "3"))
    rounds = int(os.environ.get("BENCH_WIRE_ROUNDS", "2"))
    x = load_heldout(repo / "digits").X.astype(np.float32)
    results: dict[tuple[str, int, int], list[LoadResult]] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        base_proc, base_url = start_setup("baseline", repo, tmp)
        try:
            baseline = {rows: _cell("json", base_url, "", x, rows, 1, duration_s) for rows in (1, 32)}
        finally:
            stop_setup(base_proc)
        proc, url, grpc_target = _start_default(repo, tmp)
        try:
            for r in range(rounds):
                for rows, conc in POINTS:
                    order = FORMATS if (r + rows + conc) % 2 == 0 else tuple(reversed(FORMATS))
                    for fmt in order:
                        results.setdefault((fmt, rows, conc), []).append(
                            _cell(fmt, url, grpc_target, x, rows, conc, duration_s))
        finally:
            stop_setup(proc)
    out = []
    for rows, conc in POINTS:
        json_rps = statistics.median(r.rps for r in results[("json", rows, conc)])
        p50 = {f: statistics.median(r.pct(50) for r in results[(f, rows, conc)]) for f in FORMATS}
        for fmt in FORMATS:
            res = results[(fmt, rows, conc)]
            rps = statistics.median(r.rps for r in res)
            verdict = "-"
            if fmt == "binary" and rows == 32:
                verdict = f"binary >= 1.5x JSON: {'met' if rps >= 1.5 * json_rps else 'missed'}"
            if fmt == "grpc" and conc == 1:
                verdict = f"gRPC p50 <= binary's: {'met' if p50['grpc'] <= p50['binary'] else 'missed'}"
            if conc == 1 and fmt == min(FORMATS, key=lambda f: p50[f]):
                ratio = p50[fmt] / baseline[rows].pct(50)
                verdict += f"; fastest p50 {ratio:.2f}x baseline ({'met' if ratio <= 1.3 else 'missed'} <= 1.3x)"
            out.append((fmt, str(rows), str(conc), f"{rps:.0f}", f"{rps / json_rps:.2f}x",
                        f"{p50[fmt] * 1e3:.1f}", f"{statistics.median(r.pct(99) for r in res) * 1e3:.1f}",
                        str(sum(r.errors for r in res)), verdict))
    for rows in (1, 32):
        b = baseline[rows]
        out.append(("baseline (uvicorn, JSON)", str(rows), "1", f"{b.rps:.0f}", "-", f"{b.pct(50) * 1e3:.1f}",
                    f"{b.pct(99) * 1e3:.1f}", str(b.errors), "-"))
    return out
