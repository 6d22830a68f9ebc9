"""One bad record never stops the recording, on SQLite and on the real PostgreSQL server.

Records the store cannot hold are made inside the recorder on purpose (the edge rejects such
ids, so these tests hand them to `Recorder.record_fields` directly, as a gateway's hand-over):
the hand-over's good records are stored and counted, the bad one is dropped and counted in
`ecoserve_outcomes_dropped_total{reason="invalid"}`, and every later hand-over is stored. A store
that goes away fails the hand-over (the gateway keeps it queued), and the handover gauges say
so and since when; labels posted meanwhile get a 503.
"""

from __future__ import annotations

import pytest
from test_recorder import SPEC, Clock, outcome, value

from serving.errors import Unavailable, UnprocessableEntity
from serving.recording.host import feedback_reply, raise_for_reply
from telemetry.recorder import FeedbackError, LabelItem, Recorder
from telemetry.records import outcome_fields
from telemetry.store import InvalidRecord, StoreError, is_data_error, open_store


@pytest.fixture
def rec(store_url):
    clock = Clock()
    r = Recorder({"eco": SPEC}, open_store(store_url), clock=clock)
    r.clock_ = clock
    yield r
    r.store.close()


def fields(i: int, rid: str | None = None) -> tuple:
    f = outcome_fields(outcome(i, (0, 1, 1), 1_000_000.0))
    return f if rid is None else (rid,) + f[1:]


def bad_ids(store_url: str) -> list[str]:
    """Ids each store refuses: a lone surrogate (UTF-8 cannot encode it) on both; on PostgreSQL
    also a NUL byte and an id over the key column's 128 characters."""
    ids = ["bad-\ud800"]
    if store_url.startswith("postgresql"):
        ids += ["bad-\x00-nul", "x" * 3000]
    return ids


def test_a_bad_record_is_dropped_and_counted_and_the_rest_stored(rec, store_url):
    bad = bad_ids(store_url)
    batch = [fields(i) for i in range(40)]
    for j, rid in enumerate(bad):
        batch.insert(7 + 11 * j, fields(100 + j, rid))
    report = {"progress": {"eco": len(batch)}, "dropped": {}, "serving": {}}
    got = rec.record_fields(batch, "gw1", report)
    assert got["inserted"] == 40
    assert rec.store.count_outcomes("eco") == 40
    assert value(rec, "ecoserve_outcomes_dropped_total", reason="invalid") == len(bad)
    assert value(rec, "ecoserve_outcomes_total", ecosystem="eco") == 40
    # the hand-over's progress was written (the refused records were handed over, not lost)
    assert rec.store.ledger_progress("gw1") == {"eco": len(batch)}
    # later hand-overs are all stored: nothing is stuck behind the bad record
    for k in range(3):
        rec.record_fields([fields(200 + 10 * k + i) for i in range(10)], "gw1",
                          {"progress": {"eco": len(batch) + 10 * (k + 1)}, "dropped": {}, "serving": {}})
    assert rec.store.count_outcomes("eco") == 70
    assert value(rec, "ecoserve_outcomes_total", ecosystem="eco") == 70
    assert value(rec, "ecoserve_handover_failing") == 0
    # the count survives a restart (kept with the store's event counters)
    again = Recorder({"eco": SPEC}, rec.store, clock=rec.clock_)
    assert value(again, "ecoserve_outcomes_dropped_total", reason="invalid") == len(bad)
    assert value(again, "ecoserve_outcomes_total", ecosystem="eco") == 70


def test_a_hand_over_of_only_bad_records_stores_nothing_and_fails_nothing(rec, store_url):
    bad = bad_ids(store_url)
    rec.record_fields([fields(i, rid) for i, rid in enumerate(bad)], "gw1",
                      {"progress": {"eco": len(bad)}, "dropped": {}, "serving": {}})
    assert rec.store.count_outcomes() == 0
    assert value(rec, "ecoserve_outcomes_dropped_total", reason="invalid") == len(bad)
    assert rec.store.ledger_progress("gw1") == {"eco": len(bad)}


def test_a_label_the_store_refuses_is_a_422_and_applies_nothing(rec, store_url):
    rec.record([outcome(i, (0, 1, 1), 1_000_000.0) for i in range(3)])
    # a source with a lone surrogate cannot be encoded by either store (the edge rejects it first)
    items = [LabelItem("r0", "yes"), LabelItem("r1", "no", None, "bad-\ud800")]
    with pytest.raises(FeedbackError, match=r"item 1: source: character U\+D800"):
        rec.feedback(items)
    assert rec.store.get_outcomes(["r0"])["r0"].label is None  # all or nothing
    reply = feedback_reply(rec, items)
    assert reply["status"] == 422
    with pytest.raises(UnprocessableEntity):
        raise_for_reply(reply)
    assert rec.feedback([LabelItem("r0", "yes")])[0].status == "joined"


def test_a_store_that_goes_away_fails_hand_overs_and_labels_retryably(rec, store_url):
    rec.record_fields([fields(i) for i in range(5)])
    with rec.store.engine.begin() as conn:  # the table disappears: an operational error, not a data one
        conn.exec_driver_sql("ALTER TABLE ecoserve_outcomes RENAME TO ecoserve_outcomes_away")
    try:
        rec.clock_.t += 10
        with pytest.raises(Exception) as err:
            rec.record_fields([fields(10 + i) for i in range(5)])
        assert not is_data_error(err.value)
        assert value(rec, "ecoserve_handover_failing") == 1
        assert value(rec, "ecoserve_handover_failing_since_timestamp_seconds") == rec.clock_.t
        first = rec.clock_.t
        rec.clock_.t += 10
        with pytest.raises(Exception) as again:
            rec.record_fields([fields(10 + i) for i in range(5)])
        assert not is_data_error(again.value)
        assert value(rec, "ecoserve_handover_failing_since_timestamp_seconds") == first  # since the first
        assert value(rec, "ecoserve_handover_failures_total") == 2
        assert value(rec, "ecoserve_outcomes_dropped_total", reason="invalid") == 0  # not the records' fault
        reply = feedback_reply(rec, [LabelItem("r0", "yes")])
        assert reply["status"] == 503, reply
        with pytest.raises(Unavailable):
            raise_for_reply(reply)
    finally:
        with rec.store.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE ecoserve_outcomes_away RENAME TO ecoserve_outcomes")
    rec.record_fields([fields(10 + i) for i in range(5)])  # the gateway's resend
    assert rec.store.count_outcomes("eco") == 10
    assert value(rec, "ecoserve_handover_failing") == 0
    assert value(rec, "ecoserve_handover_failing_since_timestamp_seconds") == 0
    assert value(rec, "ecoserve_outcomes_total", ecosystem="eco") == 10


def test_data_errors_are_told_from_outages():
    assert is_data_error(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
    assert is_data_error(InvalidRecord("x"))
    assert not is_data_error(StoreError("x"))
    assert not is_data_error(OSError("disk"))
    store = open_store("sqlite:///:memory:")
    try:
        from sqlalchemy.exc import OperationalError

        with pytest.raises(OperationalError) as err, store.engine.connect() as conn:
            conn.exec_driver_sql("SELECT * FROM no_such_table")
        assert not is_data_error(err.value)
    finally:
        store.close()


def test_refused_records_are_logged_once_per_kind(rec, store_url, caplog):
    for k in range(5):
        rec.record_fields([fields(10 * k), fields(10 * k + 1, "bad-" + "x" * k + "\ud800")])
    logged = [r for r in caplog.records if "store refused" in r.getMessage()]
    assert len(logged) == 1
    assert value(rec, "ecoserve_outcomes_dropped_total", reason="invalid") == 5
    assert rec.store.count_outcomes() == 5
