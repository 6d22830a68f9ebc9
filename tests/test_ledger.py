"""Crash accounting without Ray: a process that dies with records queued leaves a ledger, and the
next gateway of the same store has the recorder count exactly what was lost, once. Real
processes are SIGKILLed (the kernel must drop their locks); the store is SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from sqlalchemy import text
from test_recorder import SPEC, make_v2_store, outcome, v2_row, value

from serving.recording.shipper import OutcomeShipper
from telemetry.ledger import Ledger, find_dead, store_key
from telemetry.recorder import Recorder
from telemetry.store import SCHEMA_VERSION, open_store

ROOT = Path(__file__).resolve().parent.parent


def spawn(script: str) -> subprocess.Popen[str]:
    """Run `script` in a fresh Python; returns once it printed `ready`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"child did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_a_live_ledger_is_not_dead_and_a_killed_one_is_found_with_its_counts(tmp_path):
    proc = spawn(f"""
        import time
        from telemetry.ledger import Ledger
        led = Ledger({str(tmp_path)!r}, "child", ["digits", "credit"], "K")
        led.accept("digits", 7); led.accept("credit", 3); led.accept("digits", 1)
        led.accept("unknown-eco", 5)  # not an ecosystem of this ledger: ignored
        print("ready", flush=True)
        time.sleep(60)
    """)
    try:
        assert find_dead(tmp_path, "K") == []  # the owner holds its lock
        mine = Ledger(tmp_path, "mine", ["digits"], "K")  # this process's own: alive too
        assert find_dead(tmp_path, "K") == []
    finally:
        kill9(proc)
    dead = find_dead(tmp_path, "K")
    assert [(d.ledger_id, d.accepted) for d in dead] == [("child", {"digits": 8, "credit": 3})]
    assert find_dead(tmp_path, "K") == []  # locked by us while we reclaim it
    assert find_dead(tmp_path, "another-store") == []
    dead[0].remove()
    assert not (tmp_path / "child.ledger").exists()
    mine.accept("digits", 2)
    assert mine.accepted() == {"digits": 2}
    mine.close(remove=True)
    assert not tmp_path.exists()  # the last ledger gone, its (empty) directory goes too


def test_a_released_ledger_is_retried_and_an_unreadable_one_removed(tmp_path):
    led = Ledger(tmp_path, "gone", ["eco"], "K")
    led.accept("eco", 4)
    led.close(remove=False)  # a shutdown that could not hand over: left for reclaim
    (tmp_path / "junk.ledger").write_bytes(b"not a ledger")
    first = find_dead(tmp_path, "K")
    assert [(d.ledger_id, d.accepted) for d in first] == [("gone", {"eco": 4})]
    first[0].release()  # e.g. the recorder was unreachable
    assert not (tmp_path / "junk.ledger").exists()
    again = find_dead(tmp_path, "K")
    assert [d.ledger_id for d in again] == ["gone"]
    again[0].remove()


def test_store_progress_never_goes_down_and_a_ledger_is_reclaimed_once(store_url):
    store = open_store(store_url)
    try:
        o = outcome(1, (1, 1, 0), 1000.0)
        store.insert_outcomes([o], ("L1", {"eco": 5}))
        store.insert_outcomes([o], ("L1", {"eco": 3}))  # a late resend: ignored
        store.insert_outcomes([], ("L1", {"eco": 6, "other": 1}))
        assert store.ledger_progress("L1") == {"eco": 6, "other": 1}
        assert store.reclaim_ledger("L1", {"eco": 9, "other": 1, "third": 2}) == {"eco": 3, "other": 0, "third": 2}
        assert store.reclaim_ledger("L1", {"eco": 9, "other": 1, "third": 2}) == {}  # counted once
        assert store.reclaim_ledger("L2", {"eco": 4}) == {"eco": 4}  # nothing of it was ever stored
        events = store.event_counts()
        assert events["lost|eco"] == 7 and events["lost|third"] == 2 and "lost|other" not in events
        # a hand-over that was in flight when L1's gateway died lands after the reclaim:
        # its records are stored after all, so they are taken back from the lost count
        unlost: dict[str, int] = {}
        store.insert_outcomes([outcome(2, (0, 1, 0), 1000.0)], ("L1", {"eco": 8}), unlost)
        assert unlost == {"eco": 2} and store.event_counts()["lost|eco"] == 5
        unlost.clear()
        store.insert_outcomes([outcome(2, (0, 1, 0), 1000.0)], ("L1", {"eco": 8}), unlost)  # resent
        assert unlost == {} and store.event_counts()["lost|eco"] == 5
    finally:
        store.close()


def test_a_version_1_store_is_migrated_in_place(tmp_path):
    url = f"sqlite:///{tmp_path / 'v1.db'}"
    make_v2_store(url, [v2_row("r1", 1000.0)], version=1)  # v1: the v2 outcomes table, no ledgers
    store = open_store(url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT version FROM ecoserve_schema")).scalar() == SCHEMA_VERSION == 7
        assert store.count_outcomes() == 1
        assert store.reclaim_ledger("L", {"eco": 1}) == {"eco": 1}  # the new table works
    finally:
        store.close()


CHILD = """
    import asyncio, time
    from serving.recording.shipper import OutcomeShipper
    from telemetry.ledger import Ledger
    from telemetry.recorder import Recorder
    from telemetry.store import open_store
    from test_recorder import SPEC, outcome

    async def main():
        rec = Recorder({{"eco": SPEC}}, open_store({url!r}))
        async def send(batch, reporter, report):
            return await asyncio.to_thread(rec.record, batch, reporter, report)
        ledger = Ledger({ledger_dir!r}, "crashing", ["eco"], "K")
        shipper = OutcomeShipper(send, max_queue=10_000, max_batch=4, flush_interval_s=60, ledger=ledger)
        t = time.time()
        for r in range(2):  # two requests of 5 rows, handed over in batches of 4
            shipper.put([outcome(5 * r + i, (1, 0, 1), t) for i in range(5)])
        await shipper.flush(poll=False)
        shipper.put([outcome(500 + i, (0, 0, 1), t) for i in range(6)])  # queued, never handed over
        print("ready", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
"""


def test_a_killed_gateway_loses_its_queue_and_the_metric_says_how_many(store_url, tmp_path):
    proc = spawn(CHILD.format(url=store_url, ledger_dir=str(tmp_path)))
    kill9(proc)
    rec = Recorder({"eco": SPEC}, open_store(store_url))
    try:
        assert rec.store.count_outcomes() == 10

        async def survivor() -> dict[str, dict[str, int]]:
            async def send(batch, reporter, report):
                return rec.record(batch, reporter, report)

            async def reclaim(ledger, accepted):
                return rec.reclaim(ledger, accepted)

            shipper = OutcomeShipper(send, max_queue=100, max_batch=10, flush_interval_s=60,
                                     ledger=Ledger(tmp_path, "survivor", ["eco"], "K"), reclaim=reclaim)
            found = await shipper._reclaim_dead()
            again = await shipper._reclaim_dead()
            assert again == {}
            await shipper.close()
            return found

        assert asyncio.run(survivor()) == {"crashing": {"eco": 6}}
        assert value(rec, "ecoserve_outcomes_lost_total", ecosystem="eco") == 6
        assert value(rec, "ecoserve_outcomes_total", ecosystem="eco") == 10
        assert list(tmp_path.glob("*.ledger")) == []  # reclaimed, and the survivor's own removed at close
    finally:
        rec.store.close()
    restarted = Recorder({"eco": SPEC}, open_store(store_url))  # the count is persistent
    try:
        assert value(restarted, "ecoserve_outcomes_lost_total", ecosystem="eco") == 6
    finally:
        restarted.store.close()


def test_a_shutdown_that_cannot_hand_over_leaves_its_ledger_to_be_counted(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    rec = Recorder({"eco": SPEC}, open_store(url))

    async def broken(batch, reporter, report):
        raise ConnectionError("recorder is gone")

    async def reclaim(ledger, accepted):
        return rec.reclaim(ledger, accepted)

    async def run() -> dict[str, dict[str, int]]:
        leaving = OutcomeShipper(broken, max_queue=100, max_batch=10, flush_interval_s=60,
                                 ledger=Ledger(tmp_path / "l", "leaving", ["eco"], "K"))
        leaving.put([outcome(i, (1, 1, 1), 1000.0) for i in range(3)])
        await leaving.close(timeout_s=1)
        fresh = OutcomeShipper(broken, max_queue=100, max_batch=10, flush_interval_s=60,
                               ledger=Ledger(tmp_path / "l", "fresh", ["eco"], "K"), reclaim=reclaim)
        found = await fresh._reclaim_dead()
        fresh.ledger.close(remove=True)  # type: ignore[union-attr]
        return found

    try:
        assert asyncio.run(run()) == {"leaving": {"eco": 3}}
        assert value(rec, "ecoserve_outcomes_lost_total", ecosystem="eco") == 3
    finally:
        rec.store.close()


def test_store_key_hides_the_url():
    key = store_key("postgresql://user:secret@db/x")
    assert "secret" not in key and len(key) == 16
    assert store_key("postgresql://user:secret@db/x") == key != store_key("sqlite:///a.db")
    assert store_key(None, "ECOSERVE_STORE_URL") == store_key("ignored", "ECOSERVE_STORE_URL")


def test_a_flush_hands_over_one_period_and_drain_empties_the_queue(tmp_path):
    """Records queued while a hand-over runs wait for the next period (so each hand-over is one
    period's worth, not a stream of small ones); `drain` (shutdown) sends everything; each
    hand-over carries the ledger's progress."""
    sent: list[tuple[int, dict[str, int]]] = []

    async def run() -> None:
        shipper: OutcomeShipper

        async def send(batch, reporter, report):
            sent.append((len(batch), dict(report["progress"])))
            if len(sent) == 1:
                shipper.put([outcome(100 + i, (1, 1, 1), 1.0) for i in range(3)])  # arrives meanwhile
            return {}

        shipper = OutcomeShipper(send, max_queue=100, max_batch=4, flush_interval_s=60,
                                 ledger=Ledger(tmp_path, "L", ["eco"], "K"))
        shipper.put([outcome(i, (1, 1, 1), 1.0) for i in range(6)])
        assert await shipper.flush(poll=False) == 6  # batches of 4 + 2; the 3 newcomers wait
        assert len(shipper.queue) == 3
        assert await shipper.flush(poll=False, drain=True) == 3
        assert shipper.ledger is not None and shipper.ledger.accepted() == {"eco": 9}
        await shipper.close()

    asyncio.run(run())
    assert sent == [(4, {"eco": 4}), (2, {"eco": 6}), (3, {"eco": 9})]
    assert not (tmp_path / "L.ledger").exists()  # everything handed over: removed at close
