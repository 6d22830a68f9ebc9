"""The in-gateway recorder in a child process (`serving.recording.process`): same answers as an
in-process recorder, and what happens when the child dies between calls, after a commit but
before its reply, when its store cannot open, and when its parent dies.
Every store-backed test runs against SQLite and against the real PostgreSQL server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_recorder import SPEC, outcome

from serving.recording.host import RecorderHost
from serving.recording.process import RecorderLost, RecorderProcess
from telemetry.recorder import LabelItem
from telemetry.records import outcome_fields

ROOT = Path(__file__).resolve().parent.parent


def _settings(store_url: str) -> dict:
    return {"store_url": store_url, "sweep_interval_s": 3600.0}


def _counters(metrics: bytes) -> dict:
    """Every counter and histogram bucket, except the recorder's own CPU (each process's own)."""
    out = {}
    for fam in text_string_to_metric_families(metrics.decode()):
        for s in fam.samples:
            if ("_total" in s.name or "_bucket" in s.name) and not s.name.startswith("ecoserve_recorder_cpu"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _truth(store_url: str) -> dict:
    """The counters a new in-process recorder rebuilds from what the store holds."""
    host = RecorderHost({"eco": SPEC}, _settings(store_url))
    try:
        return _counters(host.metrics())
    finally:
        host.close()


def _outcomes(rng: np.random.Generator, n: int, start: int = 0) -> list:
    t = time.time()
    return [outcome(i, rng.integers(0, 2, 3), t, rng.choice(["female", "male"])) for i in range(start, start + n)]


def _alive(pid: int) -> bool:
    """Running (a zombie, waiting for whoever reaps it, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _total(counters: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in counters.items() if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))


def test_same_answers_as_an_in_process_recorder(store_url, tmp_path):
    rng = np.random.default_rng(0)
    outs = _outcomes(rng, 40)
    labels = [LabelItem(f"r{i}", "yes" if i % 3 else "no") for i in range(0, 40, 2)] + [LabelItem("ghost", "no")]
    sqlite_b = f"sqlite:///{tmp_path / 'b.db'}"
    proc = RecorderProcess({"eco": SPEC}, _settings(store_url))
    local = RecorderHost({"eco": SPEC}, _settings(sqlite_b))
    try:
        report = {"progress": {"eco": 40}, "dropped": {"queue_full": 2}, "serving": {}}
        got, want = proc.record(outs, "gw1", report), local.record(outs, "gw1", report)
        assert got == want and got["inserted"] == 40
        assert proc.feedback(labels) == local.feedback(labels)
        bad = proc.feedback([LabelItem("r1", "maybe")])
        assert "item 0: label" in bad["error"]  # a bad batch: the error comes back, as in-process
        assert proc.reclaim("gw0", {"eco": 5}) == local.reclaim("gw0", {"eco": 5}) == {"eco": 5}
        outside = [outcome_fields(o) for o in _outcomes(rng, 5, start=100)]  # POST /v2/outcomes' path
        assert proc.outcomes(outside) == local.outcomes(outside)
        assert proc.outcomes(outside)["unchanged"] == 5
        assert _counters(proc.metrics()) == _counters(local.metrics())
    finally:
        proc.close()
        local.close()


def test_child_killed_between_calls(store_url):
    """The next call fails (503, RecorderLost); the gateway re-sends; a new child's recorder rebuilt
    its counts from the store: nothing lower, nothing double."""
    rng = np.random.default_rng(1)
    proc = RecorderProcess({"eco": SPEC}, _settings(store_url))
    try:
        a, b = _outcomes(rng, 30), _outcomes(rng, 30, start=30)
        proc.record(a, "gw", {})
        proc.feedback([LabelItem(f"r{i}", "yes") for i in range(0, 30, 3)])
        first = proc.pid
        os.kill(first, signal.SIGKILL)
        with pytest.raises(RecorderLost):
            proc.record(b, "gw", {})
        assert proc.record(b, "gw", {})["inserted"] == 30  # the re-send, to a new child
        assert proc.pid != first and proc.starts == 2
        counters = _counters(proc.metrics())
        assert _total(counters, "ecoserve_outcomes_total", ecosystem="eco") == 60
    finally:
        proc.close()
    assert counters == _truth(store_url)


@pytest.mark.parametrize("method", ["record_fields", "feedback"])
def test_child_dies_after_commit_before_reply(store_url, tmp_path, monkeypatch, method):
    """The worst moment: the write committed, its answer never came. The new child's recorder
    counts what the store holds: the committed hand-over once (its re-send is skipped as stored),
    the committed labels once (their retry is a duplicate)."""
    monkeypatch.setenv("ECOSERVE_RECORDER_PROCESS_FAULT", f"{method}:{tmp_path / 'fired'}")
    rng = np.random.default_rng(2)
    proc = RecorderProcess({"eco": SPEC}, _settings(store_url))
    try:
        a = _outcomes(rng, 40)
        labels = [LabelItem(f"r{i}", "no") for i in range(0, 40, 2)]
        if method == "record_fields":
            with pytest.raises(RecorderLost):
                proc.record(a, "gw", {})
            assert proc.record(a, "gw", {})["inserted"] == 0  # it had committed: all skipped as stored
            proc.feedback(labels)
        else:
            proc.record(a, "gw", {})
            with pytest.raises(RecorderLost):
                proc.feedback(labels)
            assert proc.feedback(labels)["counts"] == {"duplicate": 20}  # the client's retry
        assert (tmp_path / "fired").exists() and proc.starts == 2
        counters = _counters(proc.metrics())
        assert _total(counters, "ecoserve_outcomes_total", ecosystem="eco") == 40
        assert _total(counters, "ecoserve_labeled_outcomes_total", ecosystem="eco", source="observed",
                      subgroup="all") == 20
    finally:
        proc.close()
    assert counters == _truth(store_url)


def test_a_store_that_cannot_open_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"could not start: .*outcome store \(postgresql\).*Connection refused"):
        RecorderProcess({"eco": SPEC}, _settings("postgresql://nobody@127.0.0.1:1/nothing"))


def test_the_child_dies_with_its_parent(tmp_path):
    """SIGKILL of the gateway's process takes the recorder's child with it (PR_SET_PDEATHSIG),
    so no write of a dead gateway's recorder can land after the next one counted the store."""
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("needs /proc (Linux)")
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from serving.recording.process import RecorderProcess
        from test_recorder import SPEC
        p = RecorderProcess({{"eco": SPEC}}, {{"store_url": "sqlite:///{tmp_path / 'o.db'}"}})
        print(p.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not _alive(child):
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the recorder's child process outlived its parent")


def test_close_stops_the_child_and_niceness_applies(tmp_path):
    proc = RecorderProcess({"eco": SPEC}, _settings(f"sqlite:///{tmp_path / 'o.db'}"), nice=7)
    pid = proc.pid
    with open(f"/proc/{pid}/stat") as f:
        nice = int(f.read().rsplit(")", 1)[1].split()[16])
    assert nice == min(19, os.nice(0) + 7)  # serving wins the CPU when it is contended
    proc.close()
    assert not _alive(pid)


def test_audit_crosses_to_the_child(tmp_path: Path) -> None:
    """`GET /v2/ecosystems/{name}/audit` reaches a recorder in its child process (the default
    placement of an in-gateway recorder): the same answer as the recorder in-process, errors as
    values."""
    store_url = f"sqlite:///{tmp_path / 'o.db'}"
    proc = RecorderProcess({"eco": SPEC}, _settings(store_url))
    try:
        t = time.time()
        proc.record([outcome(1, (1, 1, 1), t), outcome(2, (0, 1, 1), t + 1), outcome(3, (0, 0, 0), t + 2)], "t", {})
        assert proc.feedback([LabelItem(f"r{i}", "no") for i in (1, 2, 3)])["accepted"] == 3
        got = proc.audit("eco", "systemic", 10)
        assert [it["request_id"] for it in got["items"]] == ["r1"]  # every member said "yes"; the label is "no"
        assert got["items"][0]["outputs"] == dict.fromkeys(SPEC.members, "yes") and got["items"][0]["label"] == "no"
        assert proc.audit("nope", "systemic", 10) == {"error": "ecosystem: 'nope' is not served here", "status": 404}
    finally:
        proc.close()
