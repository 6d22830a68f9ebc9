"""Serving benchmark: ecoserve on Ray Serve vs a plain uvicorn + onnxruntime process doing the
same fan-out, measured in the same run. Each server runs in its own process; the load
generator (wrk when installed, else bench/load.py's Python client) shares the machine's
cores with it, the same for every setup.

Setups (env BENCH_SETUPS, comma-separated, selects):
- baseline: plain uvicorn + FastAPI, every digits member in one process, no Ray;
- colocated_fast: members in the gateway replica, HAProxy + throughput-optimized, recorder as its
  own deployment (the default once there are several gateway replicas);
- colocated_default: members in the gateway replica, Serve's default ingress;
- per_member_fast: one deployment per member (handles), HAProxy + throughput-optimized;
- colocated_fast_recorder_in_gateway: the same with the recorder in the gateway (the default with one
  gateway replica);
- colocated_fast_notelemetry: the default with telemetry off (no recording): the on/off ratio.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.load import LoadResult, run_load, run_wrk
from models.heldout import load_heldout
from serving.server import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
SETUPS = ["baseline", "colocated_fast", "colocated_fast_recorder_in_gateway", "colocated_fast_notelemetry",
          "colocated_default", "per_member_fast"]


def ecoserve_config(repo: Path, port: int, placement: str, telemetry: bool, tmp: Path,
                    recorder_in_gateway: bool = False) -> dict[str, Any]:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "ecoserve", "route_prefix": "/", "import_path": "serving.app:build_app",
            "args": {
                "model_repository": str(repo.resolve()),
                "provider": "cpu",
                "placement": placement,
                "gateway": {"num_cpus": 0.5},
                "members": {"num_cpus": 0.2},
                "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.0},
                "telemetry": {"enabled": telemetry, "store_url": f"sqlite:///{tmp}/outcomes-{port}.db",
                              "recorder_in_gateway": recorder_in_gateway},
                "ecosystems": {"digits": {"policy": {"kind": "primary", "primary": "mlp_a"}}},
            },
        }],
    }


def start_setup(setup: str, repo: Path, tmp: Path, telemetry: bool = True) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ)
    if setup == "baseline":
        cmd = [sys.executable, "-m", "bench.baseline_server", "--repository", str(repo), "--port", str(port)]
    else:
        placement = "per_member" if setup.startswith("per_member") else "colocated"
        fast = "1" if "_fast" in setup else "0"
        telemetry = telemetry and not setup.endswith("notelemetry")
        env.update(RAY_SERVE_ENABLE_HA_PROXY=fast, RAY_SERVE_THROUGHPUT_OPTIMIZED=fast)
        cfg = tmp / f"{setup}-{int(telemetry)}.yaml"
        cfg.write_text(yaml.safe_dump(ecoserve_config(repo, port, placement, telemetry, tmp,
                                                      recorder_in_gateway=setup.endswith("recorder_in_gateway"))))
        # (colocated_fast pins the recorder to its own deployment; the default with one gateway
        # replica is the in-gateway recorder, measured by colocated_fast_recorder_in_gateway)
        cmd = [sys.executable, "-m", "serving.cli", "serve", str(cfg)]
    log = tmp / f"{setup}-{int(telemetry)}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
    except BaseException:
        stop_setup(proc)
        print(f"{setup} failed to start; its log ends:\n" + "\n".join(log.read_text().splitlines()[-30:]))
        raise
    return proc, url


def stop_setup(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(url: str, x: Any, duration_s: float, tmpdir: str) -> dict[tuple[int, int], LoadResult]:
    out = {}
    for rows in (1, 32):
        chunk = x[:rows]
        body = json.dumps({"inputs": [{"name": "input", "shape": list(chunk.shape), "datatype": "FP32",
                                       "data": chunk.ravel().tolist()}]}).encode()
        for conc in (1, 16, 64):
            if shutil.which("wrk"):
                out[(rows, conc)] = run_wrk(f"{url}/v2/models/digits/infer", body, conc, duration_s, tmpdir)
            else:
                out[(rows, conc)] = run_load(f"{url}/v2/models/digits/infer", x, rows, conc, duration_s)
    return out


def run(repo: Path) -> list[tuple[str, ...]]:
    duration_s = float(os.environ.get("BENCH_SECONDS", "5"))
    setups = [s for s in os.environ.get("BENCH_SETUPS", ",".join(SETUPS)).split(",") if s]
    x = load_heldout(repo / "digits").X
    results: dict[str, dict[tuple[int, int], LoadResult]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setup in setups:
            proc, url = start_setup(setup, repo, Path(tmp))
            try:
                results[setup] = measure(url, x, duration_s, tmp)
            finally:
                stop_setup(proc)
    rows_out = []
    base = results.get("baseline")
    order = [s for s in SETUPS if s in results]
    for setup in order:
        res = results[setup]
        for (rows, conc), r in res.items():
            ratio = "-"
            if base is not None and setup != "baseline":
                b = base[(rows, conc)]
                ratio = f"{r.rps / b.rps:.2f}x rps, {r.pct(50) / b.pct(50):.2f}x p50"
            off = results.get("colocated_fast_notelemetry")
            if setup in ("colocated_fast", "colocated_fast_recorder_in_gateway") and off is not None:
                ratio += f"; telemetry on/off {r.rps / off[(rows, conc)].rps:.2f}x rps"
            rows_out.append((setup, str(rows), str(conc), f"{r.rps:.0f}", f"{r.pct(50) * 1e3:.1f}",
                             f"{r.pct(99) * 1e3:.1f}", str(r.errors), ratio))
    return rows_out
