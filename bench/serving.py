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
- colocated_fast_notelemetry: the default with telemetry off (no recording);
- colocated_fast_2replicas: two gateway replicas (each with every member), the recorder as its own
  deployment.

`onoff()` measures the telemetry cost alone: the default (recorder in the gateway) with
telemetry on and with it off run side by side (two Ray instances, one idle while the other is
loaded) and are measured alternately, in ABBA order over `BENCH_ROUNDS` (10) rounds of
`BENCH_ONOFF_SECONDS` (3) each, so that drift and noise on this shared machine hit both alike.
Each round gives a paired ratio (on/off, measured back to back); the table shows their median,
interquartile range and extremes. The target (on >= 0.95x off) is judged on a 90% bootstrap
interval of that median: met, missed, or inconclusive where the noise is larger than the cost.
`BENCH_ONOFF_ON` / `BENCH_ONOFF_OFF` pick other setups (a `_nogc` suffix runs one with
`ECOSERVE_GC_TUNING=0`; `_inthread` runs the in-gateway recorder on a thread of the gateway's
process, `telemetry.recorder_process: false`), `BENCH_ONOFF_POINTS` other cells (`32x64,1x1`).
`BENCH_ONOFF_ON=colocated_fast_notelemetry` is the A/A control: two identical servers, which
shows how far the machine alone moves the ratios.

Per-request risk: a `_primed` suffix sends 400 labeled digits requests before the measurement
and waits until the gateway holds the recorder's fitted label-free estimator (its answers carry
`systemic_failure_risk`); `_noestimation` turns the estimator off. `python -m bench serving risk`
runs `onoff` with ON = `colocated_fast_recorder_in_gateway_primed` and OFF = the same with
`_noestimation` (both record, both got the same labeled traffic): the cost of computing each
row's risk in the gateway, and of the recorder's periodic estimate refresh, at the same points.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.load import LoadResult, run_load, run_wrk
from ecoserve.server import free_port, wait_ready
from models.heldout import load_heldout

ROOT = Path(__file__).resolve().parent.parent
SETUPS = ["baseline", "colocated_fast", "colocated_fast_recorder_in_gateway", "colocated_fast_notelemetry",
          "colocated_fast_2replicas", "colocated_default", "per_member_fast"]


def ecoserve_config(repo: Path, port: int, placement: str, telemetry: bool, tmp: Path,
                    recorder_in_gateway: bool = False, recorder_process: bool = True,
                    gateway_replicas: int = 1, estimation: bool = True) -> dict[str, Any]:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "ecoserve", "route_prefix": "/", "import_path": "serving.app:build_app",
            "args": {
                "model_repository": str(repo.resolve()),
                "provider": "cpu",
                "placement": placement,
                "gateway": {"num_cpus": 0.5, "num_replicas": gateway_replicas},
                "members": {"num_cpus": 0.2},
                "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.0},
                "telemetry": {"enabled": telemetry, "store_url": f"sqlite:///{tmp}/outcomes-{port}.db",
                              "recorder_in_gateway": recorder_in_gateway, "recorder_process": recorder_process,
                              "estimation": {"enabled": estimation}},
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
        telemetry = telemetry and "notelemetry" not in setup
        if setup.endswith("_nogc"):
            env["ECOSERVE_GC_TUNING"] = "0"
            setup = setup.removesuffix("_nogc")
        recorder_process = not setup.endswith("_inthread")  # _inthread: the in-gateway recorder on a thread
        setup = setup.removesuffix("_inthread")
        estimation = not setup.endswith("_noestimation")
        setup = setup.removesuffix("_noestimation")
        primed = setup.endswith("_primed")
        setup = setup.removesuffix("_primed")
        env.update(RAY_SERVE_ENABLE_HA_PROXY=fast, RAY_SERVE_THROUGHPUT_OPTIMIZED=fast,
                   # HAProxy's fixed side ports, freed so that two setups can run side by side
                   RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()), RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()))
        cfg = tmp / f"{setup}-{int(telemetry)}.yaml"
        cfg.write_text(yaml.safe_dump(ecoserve_config(repo, port, placement, telemetry, tmp,
                                                      recorder_in_gateway=setup.endswith("recorder_in_gateway"),
                                                      recorder_process=recorder_process,
                                                      gateway_replicas=2 if setup.endswith("2replicas") else 1,
                                                      estimation=estimation)))
        # (colocated_fast pins the recorder to its own deployment; the default with one gateway
        # replica is the in-gateway recorder, measured by colocated_fast_recorder_in_gateway)
        cmd = [sys.executable, "-m", "ecoserve.cli", "serve", str(cfg)]
    log = tmp / f"{setup}-{int(telemetry)}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        if setup != "baseline" and primed:
            prime_estimator(url, repo, wait=estimation)
    except BaseException:
        stop_setup(proc)
        print(f"{setup} failed to start; its log ends:\n" + "\n".join(log.read_text().splitlines()[-30:]))
        raise
    return proc, url


def prime_estimator(url: str, repo: Path, wait: bool = True, timeout_s: float = 120.0) -> None:
    """400 labeled digits requests (enough to fit the label-free estimator); with `wait`, then
    until an answer carries `systemic_failure_risk` (the gateway holds the fitted estimator)."""
    held = load_heldout(repo / "digits")
    tag = f"prime{time.time_ns()}"
    labels = []
    for i in range(400):
        row = held.X[i % len(held.X)][None, :]
        body = {"id": f"{tag}-{i}", "inputs": [{"name": "input", "shape": list(row.shape), "datatype": "FP32",
                                               "data": row.ravel().tolist()}]}
        r = httpx.post(f"{url}/v2/models/digits/infer", json=body, timeout=30)
        r.raise_for_status()
        labels.append({"request_id": f"{tag}-{i}", "label": int(held.y[i % len(held.y)])})
    # (labels for outcomes not stored yet wait for them, and join when they land)
    httpx.post(f"{url}/v2/feedback", json={"labels": labels}, timeout=30).raise_for_status()
    deadline = time.monotonic() + timeout_s
    row = held.X[:1]
    body = {"inputs": [{"name": "input", "shape": list(row.shape), "datatype": "FP32", "data": row.ravel().tolist()}]}
    while wait:
        r = httpx.post(f"{url}/v2/models/digits/infer", json=body, timeout=30)
        if "systemic_failure_risk" in r.json().get("parameters", {}):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no fitted estimator reached the gateway within {timeout_s:.0f} s")
        time.sleep(1.0)


def serve_config(cfg: dict[str, Any], path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`ecoserve serve` of a config (written to `path`, its log beside it), once it answers ready."""
    path.write_text(yaml.safe_dump(cfg))
    port = cfg["http_options"]["port"]
    with path.with_suffix(".log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ecoserve.cli", "serve", str(path)], cwd=ROOT,
                                env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
    except BaseException:
        stop_setup(proc)
        raise
    return proc


def stop_setup(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(url: str, x: Any, duration_s: float, tmpdir: str) -> dict[tuple[int, int], LoadResult]:
    return {(rows, conc): _point(url, x, rows, conc, duration_s, tmpdir) for rows in (1, 32) for conc in (1, 16, 64)}


def tree_cpu_s(root: int, only: str = "") -> float:
    """CPU seconds (user + system) used so far by `root` and every process below it: a server's
    whole Ray instance (GCS, raylet, workers, HAProxy), not the load generator, not the other setup.
    With `only`: just the processes of that tree whose command line contains it."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    if only:
        tree = {p for p in tree if only.encode() in _cmdline(p)}
    return sum(cpu.get(p, 0.0) for p in tree)


def _cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def _point(url: str, x: Any, rows: int, conc: int, duration_s: float, tmpdir: str, warmup: bool = True) -> LoadResult:
    chunk = x[:rows]
    body = json.dumps({"inputs": [{"name": "input", "shape": list(chunk.shape), "datatype": "FP32",
                                   "data": chunk.ravel().tolist()}]}).encode()
    if shutil.which("wrk"):
        return run_wrk(f"{url}/v2/models/digits/infer", body, conc, duration_s, tmpdir, warmup)
    return run_load(f"{url}/v2/models/digits/infer", x, rows, conc, duration_s)


ONOFF_POINTS = ((1, 1), (1, 64), (32, 1), (32, 64))
RECORDER_CHILD = "serving.recording.process"  # the in-gateway recorder's own process


def paired_verdict(paired: list[float], target: float = 0.95, resamples: int = 2000) -> str:
    """The paired ratios' median with a 90% bootstrap interval, judged against `target`: "met"
    when the interval's low end is at or above it, "missed" when its high end is below, else
    "inconclusive" (this machine's noise is larger than the difference)."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(paired, k=len(paired))) for _ in range(resamples))
    lo, hi = meds[int(0.05 * resamples)], meds[int(0.95 * resamples) - 1]
    verdict = "met" if lo >= target else "missed" if hi < target else "inconclusive"
    return f"{lo:.2f}-{hi:.2f}: {verdict}"


def _scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    resp = httpx.get(f"{url}/metrics", timeout=30)
    if resp.status_code != 200:  # telemetry off
        return out
    for line in resp.text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            out[name] = float(v)
    return out


def store_lag_s(url: str, quiet_s: float = 0.6) -> float:
    """Seconds after the load stopped until the last record was stored (`ecoserve_outcomes_total`
    stopped growing for `quiet_s`): about one flush interval (0.25 s) when the store keeps up; more
    means records waited in the gateway's queue during the round."""
    t0 = time.perf_counter()
    last, changed = None, t0
    while True:
        total = sum(v for k, v in _scrape(url).items() if k.startswith("ecoserve_outcomes_total{"))
        now = time.perf_counter()
        if total != last:
            last, changed = total, now
        elif now - changed >= quiet_s:
            return changed - t0
        time.sleep(0.05)


def onoff(repo: Path, on_setup: str | None = None, off_setup: str | None = None) -> Sequence[tuple[str, ...]]:
    """Telemetry on vs off, side by side and interleaved (see the module docstring)."""
    # short segments, many rounds: the two halves of a pair run seconds apart, so the machine's
    # drift (minutes, on this shared VM) cancels in their ratio
    duration_s = float(os.environ.get("BENCH_ONOFF_SECONDS", "3"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "10"))
    x = load_heldout(repo / "digits").X
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        on_setup = on_setup or os.environ.get("BENCH_ONOFF_ON", "colocated_fast_recorder_in_gateway")
        off_setup = off_setup or os.environ.get("BENCH_ONOFF_OFF", "colocated_fast_notelemetry")
        points = [tuple(int(v) for v in p.split("x")) for p in os.environ["BENCH_ONOFF_POINTS"].split(",")] \
            if os.environ.get("BENCH_ONOFF_POINTS") else ONOFF_POINTS
        on_proc, on_url = start_setup(on_setup, repo, Path(tmp))
        try:
            off_proc, off_url = start_setup(off_setup, repo, Path(tmp))
            try:
                for rows, conc in points:
                    runs: dict[str, list[LoadResult]] = {"on": [], "off": []}
                    cpu_s = {"on": 0.0, "off": 0.0}
                    lags: list[float] = []
                    for url in (on_url, off_url):
                        _point(url, x, rows, conc, 1.0, tmp)  # warm-up
                    rec_s = 0.0
                    for k in range(rounds):
                        order = [("on", on_url, on_proc), ("off", off_url, off_proc)]
                        for name, url, proc in order if k % 2 == 0 else order[::-1]:
                            c0, r0 = tree_cpu_s(proc.pid), tree_cpu_s(proc.pid, RECORDER_CHILD)
                            runs[name].append(_point(url, x, rows, conc, duration_s, tmp, warmup=False))
                            cpu_s[name] += tree_cpu_s(proc.pid) - c0
                            if name == "on":
                                rec_s += tree_cpu_s(proc.pid, RECORDER_CHILD) - r0
                                lags.append(store_lag_s(url))
                    on, off = runs["on"], runs["off"]
                    paired = [a.rps / b.rps for a, b in zip(on, off)]  # each pair measured back to back
                    q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
                    cpu_on = cpu_s["on"] / max(1, sum(r.requests for r in on))
                    cpu_off = cpu_s["off"] / max(1, sum(r.requests for r in off))
                    on_rps = statistics.median(r.rps for r in on)
                    off_rps = statistics.median(r.rps for r in off)
                    on_p50 = statistics.median(r.pct(50) for r in on)
                    off_p50 = statistics.median(r.pct(50) for r in off)
                    out.append((str(rows), str(conc), f"{on_rps:.0f}", f"{off_rps:.0f}", f"{statistics.median(paired):.2f}x",
                                f"{q1:.2f}-{q3:.2f} ({min(paired):.2f}-{max(paired):.2f})", f"{on_p50 / off_p50:.2f}x",
                                f"{cpu_on * 1e3:.2f} / {cpu_off * 1e3:.2f}", f"{cpu_off / cpu_on:.2f}x",
                                f"{rec_s * 1e6 / max(1, sum(r.requests for r in on)):.0f} ({rec_s / max(cpu_s['on'], 1e-9):.1%})"
                                if rec_s else "-",
                                f"{statistics.median(lags):.2f} / {max(lags):.2f}",
                                str(sum(r.errors for r in on + off)), paired_verdict(paired)))
            finally:
                stop_setup(off_proc)
        finally:
            stop_setup(on_proc)
    return out


RISK_ON, RISK_OFF = "colocated_fast_recorder_in_gateway_primed", "colocated_fast_recorder_in_gateway_primed_noestimation"


def risk(repo: Path) -> Sequence[tuple[str, ...]]:
    """Per-request risk on vs off: `onoff` of two primed servers, one with the fitted estimator."""
    return onoff(repo, RISK_ON, RISK_OFF)


def run(repo: Path) -> Sequence[tuple[str, ...]]:
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
            rows_out.append((setup, str(rows), str(conc), f"{r.rps:.0f}", f"{r.pct(50) * 1e3:.1f}",
                             f"{r.pct(99) * 1e3:.1f}", str(r.errors), ratio))
    return rows_out
