"""The app on a two-node Ray cluster started on this machine (`ray start --head` plus a second
`ray start --address`): `ecoserve serve --address` attaches to it, the gateway and the recorder
land on different nodes, the token reaches the replicas, and every answered row is stored. While
that cluster runs, a plain `ecoserve serve` still starts its own local Ray."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import processes, write_serve_file
from serving_cases import infer_body

from ecoserve.server import free_port, wait_ready
from models.heldout import load_heldout

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
TOKEN = "cluster-token"


def _tagged(tag: str) -> dict[int, str]:
    """Live processes whose environment carries `tag`: pid -> comm."""
    return {p.pid: p.comm for p in processes() if tag.encode() in p.environ.split(b"\0") and p.state != "Z"}


@pytest.fixture
def cluster(tmp_path):
    """Two Ray nodes of one CPU each; every process they start is found again by an environment
    tag and stopped by pid (never `ray stop`, which would stop every Ray on the machine)."""
    tag = f"ECOSERVE_TEST_CLUSTER={uuid.uuid4().hex}"
    # RAY_AUTH_MODE=disabled: a second node of a token-authenticated cluster needs the head's token
    # (docs/serving.md); this test is about placement, not Ray's authentication
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1], "RAY_AUTH_MODE": "disabled", "RAY_SERVE_ENABLE_HA_PROXY": "1",
           "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "1"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common], env=env, check=True,
                       capture_output=True, text=True, timeout=120)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common], env=env, check=True,
                       capture_output=True, text=True, timeout=120)
        yield f"127.0.0.1:{port}", tag
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _tagged(tag):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(3)
        assert not _tagged(tag), _tagged(tag)


def test_serve_attaches_to_a_two_node_cluster(cluster, serving_repo, tmp_path):
    from telemetry.store import open_store

    address, tag = cluster
    http_port = free_port()
    db = tmp_path / "outcomes.db"
    path = write_serve_file(tmp_path / "serve.yaml", http_port, {
        "model_repository": str(serving_repo),
        "provider": "cpu",
        # one CPU per node: the gateway and the recorder cannot share one
        "gateway": {"num_cpus": 1.0},
        "auth": {"feedback_token_env": "ECOSERVE_FEEDBACK_TOKEN"},
        "telemetry": {"store_url": f"sqlite:///{db}", "recorder_in_gateway": False, "recorder": {"num_cpus": 1.0},
                      "flush_interval_s": 0.2, "ledger_dir": str(tmp_path / "ledgers")},
        "ecosystems": {"credit": {"policy": {"kind": "primary", "primary": "logreg"}}},
    })
    env = {**os.environ, "ECOSERVE_FEEDBACK_TOKEN": TOKEN, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "ecoserve.cli", "serve", str(path), "--address", address],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{http_port}"
    try:
        try:
            wait_ready(url, proc, timeout_s=240)
        except RuntimeError:
            raise AssertionError(proc.stdout.read()[-4000:] if proc.stdout else "") from None
        x = load_heldout(serving_repo / "credit").X[:4]
        for i in range(5):
            r = httpx.post(f"{url}/v2/models/credit/infer", json=infer_body(x, id=f"node-{i}"), timeout=30)
            assert r.status_code == 200, r.text
        # the token reached the gateway replica through the app's runtime environment
        r = httpx.post(f"{url}/v2/feedback", json={"request_id": "node-0/0", "label": "good"},
                       headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert r.status_code == 200, r.text
        # the gateway and the recorder run under different raylets (nodes)
        procs = _tagged(tag)
        raylets = {pid for pid, comm in procs.items() if comm == "raylet"}
        assert len(raylets) == 2
        replicas = [pid for pid, comm in procs.items() if comm.startswith("ray::ServeRepli")]
        parent = {p.pid: p.ppid for p in processes()}
        nodes = {parent[pid] for pid in replicas}
        assert len(replicas) >= 2 and nodes == raylets, (procs, replicas, nodes)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    store = open_store(f"sqlite:///{db}")
    try:
        assert store.count_outcomes("credit") == 20
    finally:
        store.close()
    # the cluster is left running (only the application was deleted) ...
    assert {comm for comm in _tagged(tag).values()} >= {"raylet", "gcs_server"}
    # ... and a plain `ecoserve serve` next to it starts its own local Ray instead of attaching
    port2 = free_port()
    path2 = write_serve_file(tmp_path / "local.yaml", port2, {
        "model_repository": str(serving_repo), "provider": "cpu", "gateway": {"num_cpus": 0.5},
        "telemetry": {"enabled": False}, "ecosystems": {"credit": {"policy": {"kind": "primary", "primary": "logreg"}}},
    })
    local = subprocess.Popen([sys.executable, "-m", "ecoserve.cli", "serve", str(path2)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        try:
            wait_ready(f"http://127.0.0.1:{port2}", local, timeout_s=240)
        except RuntimeError:
            raise AssertionError(local.stdout.read()[-4000:] if local.stdout else "") from None
        local.send_signal(signal.SIGTERM)
        out, _ = local.communicate(timeout=60)
        assert local.returncode == 0, out[-3000:]
        assert "When connecting to an existing cluster" not in out
    finally:
        if local.poll() is None:
            os.killpg(local.pid, signal.SIGKILL)
