"""`ecoserve serve CONFIG` as a user runs it: a child process in the foreground; SIGTERM flushes
every queued outcome record to the store (zero lost) and stops everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import processes, write_serve_file
from serving_cases import infer_body

from ecoserve.server import free_port, wait_ready
from models.heldout import load_heldout

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _pids(name: str, file: str = "comm") -> set[int]:
    """Processes whose executable's name is `name` or, for `file="cmdline"`, whose command line
    contains it."""
    if file == "cmdline":
        return {p.pid for p in processes() if name.encode() in p.cmdline}
    return {p.pid for p in processes() if p.comm == name}


def _recorder_children() -> set[int]:
    """Processes running `python -m serving.recording.process` (the in-gateway recorder's child)."""
    return _pids("serving.recording.process", file="cmdline")


@pytest.mark.parametrize("placement", [
    {"recorder_in_gateway": False},
    {"recorder_in_gateway": True},  # in a child process of the gateway (the default)
    {"recorder_in_gateway": True, "recorder_process": False},  # on a thread of the gateway's process
], ids=["recorder-deployment", "recorder-in-gateway", "recorder-in-gateway-thread"])
def test_sigterm_flushes_every_record_and_stops_everything(serving_repo, tmp_path, placement):
    from telemetry.store import open_store

    port = free_port()
    db = tmp_path / "outcomes.db"
    path = write_serve_file(tmp_path / "serve.yaml", port, {
        "model_repository": str(serving_repo),
        "provider": "cpu",
        "gateway": {"num_cpus": 0.5},
        # a long flush interval: records sit in the gateway queue at SIGTERM
        "telemetry": {"store_url": f"sqlite:///{db}", "flush_interval_s": 30, **placement},
        "ecosystems": {"digits": {"policy": {"kind": "primary", "primary": "mlp_a"}}},
    })
    before = {n: _pids(n) for n in ("raylet", "gcs_server", "haproxy")}
    children_before = _recorder_children()
    proc = subprocess.Popen([sys.executable, "-m", "ecoserve.cli", "serve", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout_s=180)
        x = load_heldout(serving_repo / "digits").X[:10]
        sent = 0
        for i in range(12):
            r = httpx.post(f"{url}/v2/models/digits/infer", json=infer_body(x, id=f"term-{i}"), timeout=30)
            assert r.status_code == 200
            sent += len(x)
        m = httpx.get(f"{url}/metrics", timeout=10)
        assert m.status_code == 200 and "ecoserve_outcomes_total" in m.text
        in_child = placement["recorder_in_gateway"] and placement.get("recorder_process", True)
        assert bool(_recorder_children() - children_before) == in_child  # the recorder's child runs iff configured
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    store = open_store(f"sqlite:///{db}")
    assert store.count_outcomes("digits") == sent, out[-4000:]  # zero records lost on a graceful stop
    store.close()
    time.sleep(2)
    for name, pids in before.items():
        assert _pids(name) <= pids, f"{name} left running after SIGTERM"
    assert _recorder_children() <= children_before, "the recorder's child process left running after SIGTERM"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/v2/health/live", timeout=2)


def _session_alive(sid: int) -> set[int]:
    """Live (not zombie) processes of session `sid`: everything `ecoserve serve` started in it."""
    return {p.pid for p in processes() if p.sid == sid and p.state != "Z"}


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_sigterm_to_the_process_group_stops_everything_within_15_s(serving_repo, tmp_path):
    """`kill -- -PGID` (systemd's KillMode=control-group): Ray's daemons die with the main process;
    the server still exits within 15 s, leaves no process and frees its port, and every answered
    row is either stored or counted as lost from its gateway's ledger (what the next start does)."""
    from serving.config import load_serve_file
    from serving.recording.host import recorder_specs
    from telemetry.ledger import find_dead
    from telemetry.recorder import Recorder
    from telemetry.store import open_store

    port = free_port()
    db = tmp_path / "outcomes.db"
    path = write_serve_file(tmp_path / "serve.yaml", port, {
        "model_repository": str(serving_repo),
        "provider": "cpu",
        "gateway": {"num_cpus": 0.5},
        "telemetry": {"store_url": f"sqlite:///{db}", "flush_interval_s": 2, "ledger_dir": str(tmp_path / "ledgers")},
        "ecosystems": {"digits": {"policy": {"kind": "primary", "primary": "mlp_a"}}},
    })
    proc = subprocess.Popen([sys.executable, "-m", "ecoserve.cli", "serve", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    answered = 0
    try:
        wait_ready(url, proc, timeout_s=180)
        time.sleep(3)
        x = load_heldout(serving_repo / "digits").X[:5]
        for i in range(10):
            r = httpx.post(f"{url}/v2/models/digits/infer", json=infer_body(x, id=f"grp-{i}"), timeout=30)
            assert r.status_code == 200
            answered += len(x)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert took < 15, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    time.sleep(0.5)
    assert not _session_alive(proc.pid), (_session_alive(proc.pid), out[-3000:])
    assert _port_free(port)
    # what the next start would count: the dead gateways' ledgers, reclaimed against the store
    cfg = load_serve_file(path).serving
    store = open_store(f"sqlite:///{db}")
    try:
        recorder = Recorder(recorder_specs(cfg), store)
        lost = 0
        for dead in find_dead(tmp_path / "ledgers" / cfg.telemetry.store_key(), cfg.telemetry.store_key()):
            lost += sum(recorder.reclaim(dead.ledger_id, dead.accepted).values())
        assert store.count_outcomes("digits") + lost == answered, out[-3000:]
    finally:
        store.close()


def test_serve_without_the_token_variable_fails_fast_naming_it(serving_repo, tmp_path):
    port = free_port()
    path = write_serve_file(tmp_path / "serve.yaml", port, {
        "model_repository": str(serving_repo), "provider": "cpu",
        "auth": {"feedback_token_env": "ECOSERVE_FEEDBACK_TOKEN"},
        "telemetry": {"store_url": f"sqlite:///{tmp_path / 'o.db'}"},
        "ecosystems": {"digits": {"policy": {"kind": "primary", "primary": "mlp_a"}}},
    })
    env = {k: v for k, v in os.environ.items() if k != "ECOSERVE_FEEDBACK_TOKEN"}
    for command in ("serve", "check-config"):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "ecoserve.cli", command, str(path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=30)
        took = time.monotonic() - t0
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert took < 2.0, took
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "ECOSERVE_FEEDBACK_TOKEN" in lines[0], proc.stderr
