"""`ecoserve serve CONFIG` as a user runs it: a child process in the foreground; SIGTERM flushes
every queued outcome record to the store (zero lost) and stops everything it started."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import write_serve_file
from models.heldout import load_heldout
from serving.server import free_port
from serving_cases import infer_body

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _pids(name: str, file: str = "comm") -> set[int]:
    """Processes whose /proc/PID/`file` is `name` (comm: the executable's name) or, for
    `file="cmdline"`, contains it."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                text = (d / file).read_bytes().decode(errors="replace")
            except OSError:
                continue
            if (name in text) if file == "cmdline" else (text.strip() == name):
                out.add(int(d.name))
    return out


def _recorder_children() -> set[int]:
    """Processes running `python -m serving.recorder_process` (the in-gateway recorder's child)."""
    return _pids("serving.recorder_process", file="cmdline")


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
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.5)
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
