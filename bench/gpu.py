"""`python -m bench gpu`: the GPU path in one command. Serves the GPU-sized demo ecosystem
(`digits_gpu`: four wide MLPs, built on first use) with `provider: cuda`, checks that every member
reports `CUDAExecutionProvider`, and prints ecoserve's throughput (gRPC, 32 rows per request,
concurrency 64) against raw ONNX Runtime running the same members on the same batches in one
process, for 1, 2 and 4 gateway replicas sharing the GPU. Target: ecoserve >= 0.8x raw with one
replica. About 2 minutes; under 8 on any machine it was sized for.

Environment: `BENCH_GPU_PROVIDER` (`cuda`, or `cpu` for a dry run of the same path on a machine
without a GPU), `BENCH_GPU_SECONDS` (10 per measurement), `BENCH_GPU_REPLICAS` (`1,2,4`).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.serving import serve_config, stop_setup
from bench.wire import GRPC_SERVICER, grpc_load
from ecoserve.server import free_port
from models.build import build_models
from models.heldout import load_heldout
from models.manifest import load_manifest
from models.runtime import cuda_device_count

ECOSYSTEM = "digits_gpu"
ROWS, CONCURRENCY = 32, 64
PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def _batches(repo: Path) -> list[np.ndarray]:
    x = load_heldout(repo / ECOSYSTEM).X.astype(np.float32)
    return [x[i : i + ROWS] for i in range(0, len(x) - ROWS, ROWS)]


def raw_onnxruntime(repo: Path, provider: str, batches: list[np.ndarray], duration_s: float) -> float:
    """Requests/s of plain ONNX Runtime: one request = every member on one batch, `CONCURRENCY`
    threads in a closed loop (sessions are thread-safe and release the GIL while they run)."""
    import onnxruntime as ort

    manifest = load_manifest(repo / ECOSYSTEM)
    sessions = [ort.InferenceSession(str(repo / ECOSYSTEM / m.onnx_path), providers=[PROVIDERS[provider]])
                for m in manifest.current_members()]
    for s in sessions:
        if s.get_providers()[0] != PROVIDERS[provider]:
            raise RuntimeError(f"onnxruntime gave {s.get_providers()[0]}, not {PROVIDERS[provider]}")
    for s in sessions:  # warm up (CUDA kernels, memory arenas)
        s.run(None, {"input": batches[0]})
    done = [0] * CONCURRENCY
    stop_at = time.perf_counter() + duration_s

    def worker(k: int) -> None:
        i = k
        while time.perf_counter() < stop_at:
            for s in sessions:
                s.run(None, {"input": batches[i % len(batches)]})
            done[k] += 1
            i += CONCURRENCY

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(CONCURRENCY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def _serve(repo: Path, provider: str, replicas: int, tmp: Path) -> tuple[Any, str, str]:
    port, grpc_port = free_port(), free_port()
    gpus = 0.2 if provider == "cuda" else 0
    cfg = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
        "applications": [{
            "name": "ecoserve", "route_prefix": "/", "import_path": "serving.app:build_app",
            "args": {
                "model_repository": str(repo.resolve()), "provider": provider,
                "gateway": {"num_cpus": 0.25, "num_gpus": gpus, "num_replicas": replicas},
                "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.0},
                "telemetry": {"store_url": f"sqlite:///{tmp}/outcomes-{replicas}.db", "recorder_in_gateway": False},
                "ecosystems": {ECOSYSTEM: {"policy": {"kind": "primary", "primary": "wide_a"}}},
            },
        }],
    }
    proc = serve_config(cfg, tmp / f"gpu-{replicas}.yaml")
    return proc, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"


def run(repo: Path) -> Sequence[tuple[str, ...]]:
    provider = os.environ.get("BENCH_GPU_PROVIDER", "cuda")
    duration_s = float(os.environ.get("BENCH_GPU_SECONDS", "10"))
    replica_counts = [int(r) for r in os.environ.get("BENCH_GPU_REPLICAS", "1,2,4").split(",")]
    if provider == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers() or cuda_device_count() == 0:
            raise SystemExit("bench gpu: no CUDA device or no CUDA build of onnxruntime here "
                             "(BENCH_GPU_PROVIDER=cpu runs the same path on the CPU)")
    build_models(repo, [ECOSYSTEM])
    batches = _batches(repo)
    raw = raw_onnxruntime(repo, provider, batches, duration_s)
    out = [("raw onnxruntime (one process)", PROVIDERS[provider], f"{raw:.0f}", "-", "-")]
    with tempfile.TemporaryDirectory() as tmpdir:
        for replicas in replica_counts:
            proc, url, target = _serve(repo, provider, replicas, Path(tmpdir))
            try:
                meta = httpx.get(f"{url}/v2/models/{ECOSYSTEM}", timeout=30).json()
                got = {m["name"]: m["provider"] for m in meta["parameters"]["members"]}
                if set(got.values()) != {PROVIDERS[provider]}:
                    raise RuntimeError(f"members' providers: {got}; expected {PROVIDERS[provider]} for all")
                res = asyncio.run(grpc_load(target, batches, CONCURRENCY, duration_s, ECOSYSTEM))
            finally:
                stop_setup(proc)
            ratio = res.rps / raw
            verdict = f"target >= 0.8x: {'met' if ratio >= 0.8 else 'missed'}" if replicas == 1 else "-"
            out.append((f"ecoserve, {replicas} gateway replica{'s' if replicas > 1 else ''} (gRPC)",
                        ", ".join(sorted(set(got.values()))), f"{res.rps:.0f}", f"{ratio:.2f}x", verdict))
    return out
