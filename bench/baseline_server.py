"""The serving baseline: one plain uvicorn + FastAPI process, every member's ONNX Runtime
session in it, the same fan-out per request (all members run, the primary's output returned),
the same JSON protocol. No Ray, no batching, no recording. `python -m bench.baseline_server`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

from models.manifest import load_manifest


def build(repo: Path, ecosystem: str, primary: str) -> FastAPI:
    d = repo / ecosystem
    manifest = load_manifest(d)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = {
        m.name: ort.InferenceSession(str(d / m.onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        for m in manifest.current_members()
    }
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        body = json.loads(await request.body())
        inp = body["inputs"][0]
        x = np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"])
        outs = {n: s.run(["label", "probabilities"], {"input": x}) for n, s in sessions.items()}
        labels, probs = outs[primary]
        return Response(
            json.dumps({
                "model_name": name,
                "outputs": [
                    {"name": "label", "datatype": "INT64", "shape": [len(labels)], "data": labels.tolist()},
                    {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
                     "data": probs.ravel().tolist()},
                ],
            }),
            media_type="application/json",
        )

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--ecosystem", default="digits")
    p.add_argument("--primary", default="mlp_a")
    p.add_argument("--port", type=int, default=8100)
    a = p.parse_args()
    uvicorn.run(build(Path(a.repository), a.ecosystem, a.primary), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
