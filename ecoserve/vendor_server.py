"""A plain Open Inference Protocol server standing for another platform or a vendor's API: what
`ecoserve demo` adds to an ecosystem as a remote member, and the tests' second server process.
`python -m ecoserve.vendor_server --port P --model-file M` serves one ONNX classifier (outputs
`label`, `probabilities`); each model name behaves differently:

- `ok`: runs the ONNX model and answers JSON (class ids), or binary outputs when asked;
- `names`: the same, with class names as strings;
- `slow`: answers after 3 s;
- `error`: HTTP 500;
- `malformed`: HTTP 200 with a body that is not an inference response;
- `short`: one value fewer than rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response


def build(model_file: str) -> FastAPI:
    """The server's app (FastAPI, JSON and binary tensors)."""
    sess = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        body = await request.body()
        length = request.headers.get("inference-header-content-length")
        head = json.loads(body[: int(length)] if length else body)
        inp = head["inputs"][0]
        if length:
            x = np.frombuffer(body[int(length):], dtype="<f4").reshape(inp["shape"])
        else:
            x = np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"])
        if name == "slow":
            await asyncio.sleep(3)
        if name == "error":
            return Response("internal trouble", status_code=500)
        if name == "malformed":
            return Response("<html>not json</html>", media_type="text/html")
        labels, probs = sess.run(["label", "probabilities"], {"input": x})
        if name == "short":
            labels = labels[:-1]
        wanted = {o["name"]: (o.get("parameters") or {}).get("binary_data", False) for o in head.get("outputs", [])}
        outputs: list[dict[str, Any]] = []
        chunks: list[bytes] = []
        for out_name, arr, dt in (("label", labels, "INT64"), ("probabilities", probs, "FP32")):
            if wanted and out_name not in wanted:
                continue
            if name == "names" and out_name == "label":
                outputs.append({"name": "label", "datatype": "BYTES", "shape": [len(arr)],
                                "data": [str(int(v)) for v in arr]})
            elif wanted.get(out_name):
                raw = np.ascontiguousarray(arr, dtype="<i8" if dt == "INT64" else "<f4").tobytes()
                chunks.append(raw)
                outputs.append({"name": out_name, "datatype": dt, "shape": list(arr.shape),
                                "parameters": {"binary_data_size": len(raw)}})
            else:
                outputs.append({"name": out_name, "datatype": dt, "shape": list(arr.shape),
                                "data": arr.ravel().tolist()})
        text = json.dumps({"model_name": name, "outputs": outputs}).encode()
        if chunks:
            return Response(text + b"".join(chunks), media_type="application/octet-stream",
                            headers={"inference-header-content-length": str(len(text))})
        return Response(text, media_type="application/json")

    return app


def start_vendor(model_file: str | Path, timeout_s: float = 60.0) -> tuple[subprocess.Popen[bytes], str]:
    """This server in a child process on a free port, once it answers ready: (process, base URL).
    Stop it with `stop_vendor`."""
    from ecoserve.server import free_port, wait_ready

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ecoserve.vendor_server", "--port", str(port), "--model-file",
                             str(model_file)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout_s=timeout_s)
    except BaseException:
        stop_vendor(proc)
        raise
    return proc, url


def stop_vendor(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model-file", required=True)
    a = p.parse_args()
    uvicorn.run(build(a.model_file), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
