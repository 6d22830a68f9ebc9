"""`python -m bench outside`: members that are not hosted here.

1. Outcome ingestion through `POST /v2/outcomes`: the real HTTP app in process (ASGI, no network)
   with a real recorder on SQLite, 50 requests of 1,000 records of an all-external ecosystem
   (credit's five members), records/s; the floor is bare multi-row INSERTs of rows of the same
   size into a fresh SQLite table in transactions of 1,000, measured in the same run.
2. The cost of one remote member in the fan-out: p50 at concurrency 1 of the digits ecosystem
   (mlp_a serving, logreg and kNN shadowing) with kNN local, and with kNN served by a plain
   Open Inference Protocol server process (`ecoserve.vendor_server`) as a remote member.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from ecoserve.vendor_server import start_vendor, stop_vendor
from models.heldout import load_heldout

N_REQUESTS, PER_REQUEST = 50, 1000
TARGET = 30_000


def _copy(repo: Path, dst: Path, src: str, name: str, members: list[dict[str, Any]] | None) -> None:
    shutil.copytree(repo / src, dst / name)
    m = yaml.safe_load((dst / name / "ecosystem.yaml").read_text())
    m["name"] = name
    if members is not None:
        m["members"] = members
    (dst / name / "ecosystem.yaml").write_text(yaml.safe_dump(m, sort_keys=False))


async def _post_all(app: Any, path: str, bodies: list[bytes]) -> float:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as c:
        t0 = time.perf_counter()
        for body in bodies:
            r = await c.post(path, content=body, timeout=120)
            if r.status_code != 200:
                raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")
        return time.perf_counter() - t0


def ingestion(repo: Path, tmp: Path) -> tuple[float, float]:
    from serving.config import parse_serving
    from serving.dataplane import Dataplane
    from serving.http import build_http_app
    from serving.recording.host import LocalTelemetry, RecorderHost, recorder_specs

    names = ["logreg", "forest", "gboost", "mlp", "knn"]
    _copy(repo, tmp, "credit", "credit_log", [{"name": n, "version": "1", "kind": "external"} for n in names])
    cfg = parse_serving({"model_repository": str(tmp), "telemetry": {"store_url": f"sqlite:///{tmp / 'o.db'}"},
                         "limits": {"max_body_bytes": 64 << 20}, "ecosystems": {"credit_log": {}}})
    host = RecorderHost(recorder_specs(cfg), cfg.telemetry.model_dump(mode="json"))
    rng = np.random.default_rng(0)
    bodies = [json.dumps({"outcomes": [
        {"request_id": f"b{k}-{i}", "ecosystem": "credit_log", "outputs": {n: int(v) for n, v in zip(names, row)},
         "subgroups": {"sex": "female" if i % 2 else "male"}}
        for i, row in enumerate(rng.integers(0, 2, (PER_REQUEST, 5)))]}).encode() for k in range(N_REQUESTS)]
    try:
        def no_members(*_: Any) -> Any:  # an all-external ecosystem: no member is ever loaded
            raise AssertionError("no member is served here")

        app = build_http_app(Dataplane.build(cfg, no_members), LocalTelemetry(host))
        seconds = asyncio.run(_post_all(app, "/v2/outcomes", bodies))
        assert host.store.count_outcomes("credit_log") == N_REQUESTS * PER_REQUEST
    finally:
        host.close()
    # the floor: bare multi-row INSERTs of rows of the same size, 1,000 per transaction
    conn = sqlite3.connect(tmp / "floor.db")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (request_id TEXT PRIMARY KEY, ecosystem TEXT, created_at REAL, context INTEGER, "
                 "payload TEXT, propensities TEXT, groups TEXT)")
    payload, props, groups = "[[0,1,1,0,1],-1,-1,-1,true,\"\"]", "[0.0,0.0,0.0,0.0,0.0]", '{"sex": "female"}'
    sql = "INSERT INTO t VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * 500)
    t0 = time.perf_counter()
    for k in range(N_REQUESTS):
        with conn:
            for half in range(2):
                rows = [(f"f{k}-{half}-{i}", "credit_log", time.time(), 1, payload, props, groups) for i in range(500)]
                conn.execute(sql, [v for r in rows for v in r])
    floor = time.perf_counter() - t0
    conn.close()
    n = N_REQUESTS * PER_REQUEST
    return n / seconds, n / floor


def remote_cost(repo: Path, tmp: Path, requests: int = 300) -> tuple[float, float]:
    from models.runtime import load_member
    from serving.config import parse_serving
    from serving.dataplane import Dataplane
    from serving.http import build_http_app
    from serving.members import LocalMember

    vendor, vendor_url = start_vendor(repo / "digits/knn/1/model.onnx")
    try:
        _copy(repo, tmp, "digits", "digits_r", None)
        m = yaml.safe_load((tmp / "digits_r/ecosystem.yaml").read_text())
        m["members"].append({"name": "vendor", "version": "1", "kind": "remote",
                             "remote": {"url": vendor_url, "model": "ok"}})
        (tmp / "digits_r/ecosystem.yaml").write_text(yaml.safe_dump(m, sort_keys=False))
        x = load_heldout(repo / "digits").X[:1]
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        p50 = []
        for members in (["mlp_a", "logreg", "knn"], ["mlp_a", "logreg", "vendor"]):
            cfg = parse_serving({"model_repository": str(tmp), "provider": "cpu", "ecosystems": {
                "digits_r": {"policy": {"kind": "primary", "primary": "mlp_a"}, "members": members}}})
            app = build_http_app(Dataplane.build(cfg, lambda d, mf, s: LocalMember(load_member(d, mf, s, "cpu"))))

            async def go(app: Any = app) -> list[float]:
                lat = []
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as c:
                    for i in range(requests + 20):
                        t0 = time.perf_counter()
                        r = await c.post("/v2/models/digits_r/infer", content=body)
                        if r.status_code != 200:
                            raise RuntimeError(r.text)
                        if i >= 20:  # warm-up
                            lat.append(time.perf_counter() - t0)
                return lat

            p50.append(statistics.median(asyncio.run(go())))
        return p50[0], p50[1]
    finally:
        stop_vendor(vendor)


def run(repo: Path) -> Sequence[tuple[str, ...]]:
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        rps, floor = ingestion(repo, tmp / "a")
        local, remote = remote_cost(repo, tmp / "b")
    verdict = f"target >= {TARGET:,}/s: {'met' if rps >= TARGET else 'missed'}"
    return [
        ("POST /v2/outcomes into SQLite (batches of 1,000)", f"{rps:,.0f} records/s",
         f"floor: bare INSERTs {floor:,.0f} rows/s", f"{rps / floor:.2f}x", verdict),
        ("one remote member in the fan-out (c1 p50)", f"{remote * 1e3:.2f} ms (kNN remote)",
         f"{local * 1e3:.2f} ms (kNN local)", f"+{(remote - local) * 1e3:.2f} ms", "-"),
    ]
