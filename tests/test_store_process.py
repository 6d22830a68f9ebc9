"""The store in a child process (`telemetry.store_process`): what happens when the child dies,
during a call or between calls, when it cannot open its store, and when its parent dies.
Every test runs against SQLite and against the real PostgreSQL server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from telemetry.recorder import LabelItem, Recorder
from telemetry.store import StoreError, StoreLost, open_store
from telemetry.store_process import StoreProcess
from test_recorder import SPEC, Clock, outcome, samples


def _alive(pid: int) -> bool:
    """Running (a zombie, waiting for whoever reaps it, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _counters(r: Recorder) -> dict:
    return {k: v for k, v in samples(r).items()
            if ("_total" in k[0] or "_bucket" in k[0]) and not k[0].startswith("ecoserve_recorder_cpu")}


def _truth(store_url: str, clock: Clock) -> dict:
    """The counters a fresh recorder rebuilds from what the store holds (in this process)."""
    store = open_store(store_url)
    try:
        return _counters(Recorder({"eco": SPEC}, store, clock=clock))
    finally:
        store.close()


def _batches(rng: np.random.Generator, clock: Clock, n: int, start: int = 0) -> list:
    return [outcome(i, rng.integers(0, 2, 3), clock.t, rng.choice(["female", "male"])) for i in range(start, start + n)]


def test_results_match_the_in_process_store(store_url, tmp_path):
    """Same calls, same answers: inserted ids, skipped ids, ledger progress, labels, pending."""
    sp = StoreProcess(store_url)
    try:
        clock = Clock()
        outs = _batches(np.random.default_rng(0), clock, 20)
        assert sp.insert_outcomes(outs[:10], ("L1", {"eco": 10})) == {f"r{i}" for i in range(10)}
        # 5 stored, 5 new: only the new come back
        assert sp.insert_outcomes(outs[5:15], ("L1", {"eco": 20})) == {f"r{i}" for i in range(10, 15)}
        assert sp.ledger_progress("L1") == {"eco": 20}
        assert sp.count_outcomes("eco") == 15
        got = sp.get_outcomes(["r3", "r14", "nope"])
        assert set(got) == {"r3", "r14"} and list(got["r3"].predictions) == list(outs[3].predictions)
        assert sum(len(b) for b in sp.iter_outcomes("eco", batch=4)) == 15
        sp.apply_labels([], [], [{"request_id": "r17", "label": "yes", "source": "observed",
                                  "label_time": 1.0, "received_at": 1.0}])
        assert sp.count_pending() == 1 and sp.take_pending(["r17"])[0]["label"] == "yes"
        assert sp.reclaim_ledger("L1", {"eco": 23}) == {"eco": 3}
        assert sp.event_counts() == {"lost|eco": 3}
    finally:
        sp.close()


def test_child_killed_between_calls(store_url):
    """The next call fails with StoreLost, the recorder recounts from the store, a new child
    serves the re-sent batch, and no counter is lower or double."""
    clock, rng = Clock(), np.random.default_rng(1)
    sp = StoreProcess(store_url)
    rec = Recorder({"eco": SPEC}, sp, clock=clock)
    a, b = _batches(rng, clock, 30), _batches(rng, clock, 30, start=30)
    rec.record(a)
    rec.feedback([LabelItem(f"r{i}", "yes") for i in range(0, 30, 3)])
    first = sp.pid
    os.kill(first, signal.SIGKILL)
    with pytest.raises(StoreLost):
        rec.record(b)
    assert rec.resyncs == 1
    rec.record(b)  # the gateway re-sends
    assert sp.pid != first and sp.starts == 2
    assert _counters(rec) == _truth(store_url, clock)
    assert samples(rec)[("ecoserve_outcomes_total", (("ecosystem", "eco"),))] == 60
    sp.close()


@pytest.mark.parametrize("method", ["insert_outcomes", "apply_labels"])
def test_child_dies_after_commit_before_reply(store_url, tmp_path, monkeypatch, method):
    """The worst moment: the write committed, its answer never came. The recorder cannot know,
    so it recounts from the store: what committed is counted once (the re-sent batch is skipped
    as stored, a re-sent label is a duplicate), nothing is counted that did not commit."""
    monkeypatch.setenv("ECOSERVE_STORE_PROCESS_FAULT", f"{method}:{tmp_path / 'fired'}")
    clock, rng = Clock(), np.random.default_rng(2)
    sp = StoreProcess(store_url)
    rec = Recorder({"eco": SPEC}, sp, clock=clock)
    a = _batches(rng, clock, 40)
    labels = [LabelItem(f"r{i}", "no") for i in range(0, 40, 2)]
    if method == "insert_outcomes":
        with pytest.raises(StoreLost):
            rec.record(a)
        assert sp.count_outcomes() == 40  # it did commit
        rec.record(a)  # re-sent: all skipped as stored, and counted once (by the recount)
        rec.feedback(labels)
    else:
        rec.record(a)
        with pytest.raises(StoreLost):
            rec.feedback(labels)
        assert rec.feedback(labels)[0].status == "duplicate"  # the client retries: already applied
    assert (tmp_path / "fired").exists() and rec.resyncs == 1
    assert _counters(rec) == _truth(store_url, clock)
    s = samples(rec)
    assert s[("ecoserve_outcomes_total", (("ecosystem", "eco"),))] == 40
    assert sum(v for (name, lab), v in s.items() if name == "ecoserve_labeled_outcomes_total"
               and dict(lab).get("subgroup") == "all" and dict(lab).get("source") == "observed") == 20
    sp.close()


def test_a_store_that_cannot_open_is_a_clear_error():
    with pytest.raises(StoreError, match=r"outcome store \(postgresql\).*Connection refused"):
        StoreProcess("postgresql://nobody@127.0.0.1:1/nothing")


def test_database_errors_come_back_and_the_child_stays(store_url):
    sp = StoreProcess(store_url)
    try:
        pid = sp.pid
        with pytest.raises(StoreError) as info:
            sp.apply_labels([{"request_id": "r1"}], [])  # a malformed call: a KeyError in the child
        assert not isinstance(info.value, StoreLost)
        assert sp.pid == pid and sp.count_outcomes() == 0
    finally:
        sp.close()


def test_the_child_dies_with_its_parent(tmp_path):
    """SIGKILL of the recorder's process takes the store's child with it (PR_SET_PDEATHSIG),
    so no write of a dead recorder can land after its replacement counted the store."""
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    script = textwrap.dedent(f"""
        import sys, time
        from telemetry.store_process import StoreProcess
        sp = StoreProcess("sqlite:///{tmp_path / 'o.db'}")
        print(sp.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(__file__)))
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
    pytest.fail("the store's child process outlived its parent")


def test_close_stops_the_child(store_url):
    sp = StoreProcess(store_url)
    pid = sp.pid
    assert _alive(pid)
    sp.close()
    assert not _alive(pid)


def test_the_child_runs_at_the_configured_niceness(tmp_path):
    """`telemetry.store_process_nice`: serving wins the CPU when it is contended."""
    sp = StoreProcess(f"sqlite:///{tmp_path / 'o.db'}", nice=7)
    try:
        with open(f"/proc/{sp.pid}/stat") as f:
            nice = int(f.read().rsplit(")", 1)[1].split()[16])
        assert nice == min(19, os.nice(0) + 7)
    finally:
        sp.close()
