"""The recorder without Ray: label join semantics, assumed labels, restart safety, metrics.
Every test runs against SQLite and against the real PostgreSQL server."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from telemetry.metrics import METRICS, exposition
from telemetry.recorder import FeedbackError, LabelItem, Recorder
from telemetry.records import Outcome, outcome_fields
from telemetry.spec import EcosystemSpec
from telemetry.store import SCHEMA_VERSION, open_store

MEMBERS = ("a", "b", "c")
SPEC = EcosystemSpec(
    name="eco", members=MEMBERS, classes=("no", "yes"), subgroups={"sex": ("female", "male")},
    assume_label_after_s=600.0, assumed_label="no",
)


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def outcome(i: int, preds, t: float, sex: str = "female", served: int = 0) -> Outcome:
    return Outcome(f"r{i}", "eco", t, MEMBERS, ("1", "1", "1"), tuple(preds), served, served,
                   (0.5, 0.3, 0.2), 0, "thompson", False, {"sex": sex}, f"fp{i}")


def samples(recorder: Recorder) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(exposition(recorder).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(recorder, name, **labels):
    return samples(recorder).get((name, tuple(sorted(labels.items()))))


ALL = {"subgroup": "all", "subgroup_value": "all"}


@pytest.fixture
def rec(store_url):
    clock = Clock()
    r = Recorder({"eco": SPEC}, open_store(store_url), clock=clock, pending_ttl_s=100.0)
    r.clock_ = clock
    yield r
    r.store.close()


def test_schema_is_versioned(store_url):
    s = open_store(store_url)
    assert s.migrate() == SCHEMA_VERSION
    s.close()


def _indexes(store) -> dict[str, str]:
    """Index name -> its definition (SQLite's or PostgreSQL's own text) of ecoserve_outcomes."""
    with store.engine.connect() as conn:
        if store.backend == "sqlite":
            rows = conn.exec_driver_sql(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'ecoserve_outcomes'")
        else:
            rows = conn.exec_driver_sql(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'ecoserve_outcomes'")
        return {name: sql or "" for name, sql in rows}


def _label(store, ids, t: float, label: float = 1.0, source: str = "observed") -> None:
    store.apply_labels([(r, "eco", label, source, t, t, "") for r in ids], [])


def test_coverage_and_the_sweep_query_match_a_count_by_hand(store_url):
    """Label coverage by age and the sweep's unlabeled outcomes, against the same counts done in
    Python, with labeled, unlabeled and assumed outcomes of every age (v3's partial index)."""
    store = open_store(store_url)
    try:
        now = 1_000_000.0
        ages = [5.0, 50.0, 500.0, 5000.0, 50000.0]
        store.insert_outcomes([outcome(i, (1, 1, 0), now - ages[i % 5] - i) for i in range(60)])
        labeled = {f"r{i}" for i in range(60) if i % 3 == 0}
        _label(store, sorted(labeled), now)
        assumed = {f"r{i}" for i in range(60) if i % 7 == 0} - labeled
        _label(store, sorted(assumed), now, 0.0, "assumed")
        created = {f"r{i}": now - ages[i % 5] - i for i in range(60)}
        for age in (0.0, 60.0, 600.0, 6000.0, 1e6):
            older = {r for r, t in created.items() if t <= now - age}
            assert store.coverage("eco", now, [age]) == {age: (len(older), len(older & (labeled | assumed)))}
            assert store.coverage("other", now, [age]) == {age: (0, 0)}
        for before in (now, now - 100.0, now - 10_000.0):
            want = {r for r, t in created.items() if t < before} - labeled - assumed
            assert {o.request_id for o in store.unlabeled_before("eco", before)} == want
            assert len(store.unlabeled_before("eco", before, limit=3)) == min(3, len(want))
        assert store.unlabeled_before("other", now) == []
    finally:
        store.close()


def test_v3_indexes_unlabeled_outcomes_only(store_url):
    """The schema's indexes of ecoserve_outcomes: the (ecosystem, label_source) index of every
    outcome is gone, the partial index of unlabeled ones is there, on either backend."""
    store = open_store(store_url)
    try:
        idx = _indexes(store)
        assert "ix_ecoserve_outcomes_eco_source" not in idx
        assert "ix_ecoserve_outcomes_eco_created" in idx
        assert "label_source is null" in idx["ix_ecoserve_outcomes_unlabeled"].lower().replace("(", "").replace(")", "")
    finally:
        store.close()


def _v2_table():
    """ecoserve_outcomes as schema version 2 laid it out: a column per field."""
    from sqlalchemy import Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text

    return Table(
        "ecoserve_outcomes", MetaData(),
        Column("request_id", String(128), primary_key=True), Column("ecosystem", String(64), nullable=False),
        Column("created_at", Float, nullable=False), Column("members", Text, nullable=False),
        Column("versions", Text, nullable=False), Column("predictions", Text, nullable=False),
        Column("served", Integer, nullable=False), Column("intended", Integer, nullable=False),
        Column("greedy", Integer, nullable=False), Column("propensities", Text, nullable=False),
        Column("policy", String(32), nullable=False), Column("direct", Boolean, nullable=False),
        Column("groups", Text, nullable=False), Column("fingerprint", String(32), nullable=False),
        *[Column(c, Float) for c in ("label", "label_time", "label_received_at", "counted_label", "counted_time")],
        *[Column(c, String(64)) for c in ("label_source", "counted_source", "counted_origin")],
        Index("ix_ecoserve_outcomes_eco_created", "ecosystem", "created_at"),
        Index("ix_ecoserve_outcomes_eco_source", "ecosystem", "label_source"),
    )


def v2_row(rid: str, created_at: float, **fields) -> dict:
    """One outcome as a v2 row (a column per field; unlabeled unless `fields` say otherwise)."""
    import json

    return {"request_id": rid, "ecosystem": "eco", "created_at": created_at, "members": json.dumps(list(MEMBERS)),
            "versions": json.dumps(["1", "1", "1"]), "predictions": "[1, 1, 0]", "served": 0, "intended": 0,
            "greedy": 0, "propensities": "[0.5, 0.3, 0.2]", "policy": "thompson", "direct": False, "groups": "{}",
            "fingerprint": "fp", **{c: None for c in ("label", "label_source", "label_time", "label_received_at",
                                                     "counted_label", "counted_source", "counted_time", "counted_origin")},
            **fields}


def make_v2_store(url: str, rows: list[dict], version: int = 2) -> None:
    """Turn a fresh store into what schema version 2 (or 1: also without ledgers) left: the v2
    outcomes table holding `rows`, no contexts, no view."""
    store = open_store(url)
    try:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("DROP VIEW ecoserve_outcomes_v")
            conn.exec_driver_sql("DROP TABLE ecoserve_outcomes")
            conn.exec_driver_sql("DROP TABLE ecoserve_contexts")
            if version < 2:
                conn.exec_driver_sql("DROP TABLE ecoserve_ledgers")
            v2 = _v2_table()
            v2.create(conn)
            if rows:
                conn.execute(v2.insert(), rows)
            conn.exec_driver_sql(f"UPDATE ecoserve_schema SET version = {int(version)}")
    finally:
        store.close()


def test_a_version_2_store_is_migrated_in_place(store_url, monkeypatch):
    """A v2 store (a column per field, the (ecosystem, label_source) index) is rewritten in the v3
    layout: every outcome reads back the same, labels and counted labels carried over, contexts
    shared, the v2 columns still readable through the `ecoserve_outcomes_v` view."""
    import json

    rows = []
    for i in range(12):  # four contexts (two version lists, two policies)
        rows.append(v2_row(
            f"r{i:02d}", 1000.0 + i, versions=json.dumps(["1", "1", str(1 + i % 2)]),
            predictions=json.dumps([i % 2, -1 if i == 3 else 1, 0]), served=i % 3, intended=i % 3,
            propensities=json.dumps([0.5, 0.25, 0.25]), policy="thompson" if i < 8 else "primary",
            direct=i == 5, groups=json.dumps({"sex": "male"} if i % 2 else {}), fingerprint=f"fp{i}",
            **({"label": 1.0, "label_source": "observed", "label_time": 2000.0, "label_received_at": 2001.0,
                "counted_label": 0.0, "counted_source": "assumed", "counted_time": 1500.0, "counted_origin": "x"}
               if i < 4 else {}),
        ))
    make_v2_store(store_url, rows)
    monkeypatch.setattr("telemetry.store.migrations.MIGRATE_BATCH", 5)  # copied in three steps
    store = open_store(store_url)
    s3 = None
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version FROM ecoserve_schema").scalar() == SCHEMA_VERSION == 7
            assert conn.exec_driver_sql("SELECT count(*) FROM ecoserve_contexts").scalar() == 4
            view = {r.request_id: r._mapping for r in conn.exec_driver_sql("SELECT * FROM ecoserve_outcomes_v")}
        idx = _indexes(store)
        assert "ix_ecoserve_outcomes_unlabeled" in idx and "ix_ecoserve_outcomes_eco_source" not in idx
        got = store.get_outcomes([r["request_id"] for r in rows])
        assert len(got) == 12
        for r in rows:
            o = got[r["request_id"]]
            assert (o.ecosystem, o.created_at, o.predictions, o.served, o.intended, o.greedy, o.propensities,
                    o.direct, o.groups) == (r["ecosystem"], r["created_at"], json.loads(r["predictions"]), r["served"],
                                            r["intended"], r["greedy"], json.loads(r["propensities"]), r["direct"],
                                            json.loads(r["groups"]))
            assert (o.label, o.label_source, o.counted_label, o.counted_source, o.counted_time) == (
                r["label"], r["label_source"], r["counted_label"], r["counted_source"], r["counted_time"])
            v = view[r["request_id"]]
            for f in ("members", "versions", "policy", "fingerprint", "served", "label_time", "counted_origin"):
                assert v[f] == r[f], f
            assert bool(v["direct"]) == r["direct"] and json.loads(v["predictions"]) == json.loads(r["predictions"])
            assert json.loads(v["groups"]) == json.loads(r["groups"])
        assert store.coverage("eco", 3000.0, [0.0]) == {0.0: (12, 4)}
        assert {o.request_id for o in store.unlabeled_before("eco", 3000.0)} == {f"r{i:02d}" for i in range(4, 12)}
        assert store.label_history("r01")[0] | {"kind": "first"} == store.label_history("r01")[0]
        # new outcomes after the migration share the contexts already there
        store.insert_outcomes([outcome(99, (0, 1, 1), 4000.0)])
        assert store.get_outcomes(["r99"])["r99"].predictions == [0, 1, 1]
        assert store.migrate() == SCHEMA_VERSION  # idempotent
        store.close()
        s3 = open_store(store_url)  # and it opens again
        assert s3.count_outcomes() == 13
    finally:
        store.close()
        if s3 is not None:
            s3.close()


def test_migrate_store_command(store_url, monkeypatch, capsys):
    """`ecoserve migrate-store` migrates a v2 store ahead of the first start and says what it holds;
    a URL it cannot open is one line and exit status 2."""
    from ecoserve.cli import main

    make_v2_store(store_url, [])
    monkeypatch.setenv("ECOSERVE_TEST_STORE", store_url)
    assert main(["migrate-store", "--url-env", "ECOSERVE_TEST_STORE"]) == 0
    backend = "sqlite" if store_url.startswith("sqlite") else "postgresql"
    assert capsys.readouterr().out.strip() == f"outcome store ({backend}): schema version {SCHEMA_VERSION}, 0 outcomes"
    store = open_store(store_url)
    try:
        assert "ix_ecoserve_outcomes_unlabeled" in _indexes(store)
    finally:
        store.close()
    assert main(["migrate-store", "postgresql://nobody@127.0.0.1:1/none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ecoserve migrate-store: error: cannot") and len(err.strip().splitlines()) == 1
    assert main(["migrate-store", "--url-env", "ECOSERVE_TEST_UNSET"]) == 2
    assert "ECOSERVE_TEST_UNSET is not set" in capsys.readouterr().err


def test_join_duplicate_correction_unknown_and_early_labels(rec):
    t0 = rec.clock_.t
    rec.record([outcome(1, (1, 1, 0), t0), outcome(2, (0, 0, 0), t0)])
    rec.clock_.t += 3 * 86400  # labels arrive days later
    res = rec.feedback([
        LabelItem("r1", "yes", source="click"),
        LabelItem("r1", "yes"),         # duplicate: idempotent
        LabelItem("r2", 1),             # by class id
        LabelItem("r2", "no"),          # different: a correction
        LabelItem("r9", "yes"),         # early (or unknown): held
    ])
    assert [r.status for r in res] == ["joined", "duplicate", "joined", "correction", "pending"]
    assert res[-1].unknown_request_id
    labeled = value(rec, "ecoserve_labeled_outcomes_total", ecosystem="eco", source="observed", **ALL)
    assert labeled == 2  # the correction did not count r2 twice
    assert value(rec, "ecoserve_label_corrections_total", ecosystem="eco", from_source="observed", to_source="observed") == 1
    assert value(rec, "ecoserve_labels_duplicate_total", ecosystem="eco") == 1
    assert value(rec, "ecoserve_feedback_unknown_id_total") == 1
    assert value(rec, "ecoserve_labels_pending") == 1
    # the delay was recorded: both labels landed in the (1 day, 3 days] bucket
    assert value(rec, "ecoserve_label_delay_seconds_bucket", ecosystem="eco", source="observed", le="86400") == 0
    assert value(rec, "ecoserve_label_delay_seconds_bucket", ecosystem="eco", source="observed", le="259200") == 2
    # the label history keeps the correction; the counted label stays the first one
    hist = rec.store.label_history("r2")
    assert [(h["kind"], h["label"]) for h in hist] == [("first", 1.0), ("correction", 0.0)]
    assert rec.store.get_outcomes(["r2"])["r2"].counted_label == 1.0
    # the early label joins when its outcome arrives
    stats = rec.record([outcome(9, (1, 0, 1), rec.clock_.t)])
    assert stats["joined_pending"] == 1
    assert value(rec, "ecoserve_labels_pending") == 0
    assert value(rec, "ecoserve_labeled_outcomes_total", ecosystem="eco", source="observed", **ALL) == 3


def test_counters_match_definitions(rec):
    rng = np.random.default_rng(0)
    n = 200
    preds = rng.integers(0, 2, (n, 3))
    labels = rng.integers(0, 2, n)
    sexes = rng.choice(["female", "male", "x"], n)
    rec.record([outcome(i, preds[i], rec.clock_.t, sexes[i]) for i in range(n)])
    rec.feedback([LabelItem(f"r{i}", int(labels[i])) for i in range(n)])
    wrong = preds != labels[:, None]
    k = wrong.sum(axis=1)
    for kk in range(4):
        assert value(rec, "ecoserve_failures_per_instance_total", ecosystem="eco", source="observed", k=str(kk), **ALL) == (k == kk).sum()
    for a, m in enumerate(MEMBERS):
        assert value(rec, "ecoserve_member_correct_total", ecosystem="eco", member=m, source="observed", **ALL) == (~wrong[:, a]).sum()
    other = ~np.isin(sexes, ["female", "male"])
    assert value(rec, "ecoserve_failures_per_instance_total", ecosystem="eco", source="observed", k="3",
                 subgroup="sex", subgroup_value="other") == (k[other] == 3).sum()
    agree = (preds[:, 0] == preds[:, 1]).sum()
    assert value(rec, "ecoserve_pair_agreements_total", ecosystem="eco", member_a="a", member_b="b", **ALL) == agree
    sfr = value(rec, "ecoserve_window_systemic_failure_ratio", ecosystem="eco", **ALL)
    assert sfr == pytest.approx((k == 3).mean())
    base = value(rec, "ecoserve_window_systemic_failure_baseline_ratio", ecosystem="eco", **ALL)
    assert base == pytest.approx(np.prod(wrong.mean(axis=0)))


def test_window_counts_each_outcome_once_labeled_or_not(rec):
    """Label-free window gauges count every outcome once, at prediction time; labels add only the
    label part (a label used to add its outcome's predictions to the window a second time)."""
    rng = np.random.default_rng(7)
    n = 120
    preds = rng.integers(0, 2, (n, 3))
    rec.record([outcome(i, preds[i], rec.clock_.t) for i in range(n)])
    rec.feedback([LabelItem(f"r{i}", int(rng.integers(0, 2))) for i in range(0, n, 3)])  # a third labeled
    counts, _ = rec.window_totals("eco")
    assert counts.n_outcomes == counts.n_predicted == n and counts.n_labeled == len(range(0, n, 3))
    unanimous = (preds == preds[:, :1]).all(axis=1)
    assert counts.unanimous == unanimous.sum()
    assert value(rec, "ecoserve_window_unanimity_ratio", ecosystem="eco", **ALL) == pytest.approx(unanimous.mean())
    agree = (preds[:, 0] == preds[:, 2]).mean()
    assert value(rec, "ecoserve_window_agreement_ratio", ecosystem="eco", member_a="a", member_b="c") == pytest.approx(agree)
    female = counts.groups["sex"]["female"]
    assert female.n_predicted == n and female.n_labeled == len(range(0, n, 3))
    # the served-output distribution: every outcome once (member "a" served), labels change nothing
    served = np.bincount(preds[:, 0], minlength=2)
    for cls, k in zip(("no", "yes"), served):
        assert value(rec, "ecoserve_served_outputs_total", ecosystem="eco", output=cls) == k
    q = served[served > 0] / n
    assert value(rec, "ecoserve_window_served_output_entropy", ecosystem="eco") == pytest.approx(-(q * np.log2(q)).sum())


def test_bad_label_rejects_the_whole_batch(rec):
    rec.record([outcome(1, (1, 1, 0), rec.clock_.t), outcome(2, (1, 1, 0), rec.clock_.t)])
    with pytest.raises(FeedbackError, match=r"item 1: label: 'maybe' is not a class"):
        rec.feedback([LabelItem("r1", "yes"), LabelItem("r2", "maybe")])
    with pytest.raises(FeedbackError, match="item 0: label: class id 7 out of range"):
        rec.feedback([LabelItem("r1", 7)])
    with pytest.raises(FeedbackError, match="item 0: label: class id -1 out of range"):
        rec.feedback([LabelItem("r1", -1)])
    with pytest.raises(FeedbackError, match="item 0: label: must be a class or a number, got True"):
        rec.feedback([LabelItem("r1", True)])  # a bool is not a class id, though Python calls it an int
    with pytest.raises(FeedbackError, match="item 0: label: class id 0.5 out of range"):
        rec.feedback([LabelItem("r1", 0.5)])
    assert rec.store.get_outcomes(["r1"])["r1"].label is None  # nothing half-applied
    assert value(rec, "ecoserve_labeled_outcomes_total", ecosystem="eco", source="observed", **ALL) == 0


def test_assumed_labels_then_a_real_label_is_a_correction(rec):
    t0 = rec.clock_.t
    rec.record([outcome(1, (1, 1, 0), t0), outcome(2, (0, 0, 1), t0 + 500)])
    rec.clock_.t = t0 + 700  # r1 is past assume_label_after_s, r2 is not
    assert rec.sweep()["assumed"] == 1
    assert value(rec, "ecoserve_labeled_outcomes_total", ecosystem="eco", source="assumed", **ALL) == 1
    assert rec.sweep()["assumed"] == 0  # finalized once
    res = rec.feedback([LabelItem("r1", "yes")])
    assert res[0].status == "correction"
    assert value(rec, "ecoserve_label_corrections_total", ecosystem="eco", from_source="assumed", to_source="observed") == 1
    assert value(rec, "ecoserve_labeled_outcomes_total", ecosystem="eco", source="observed", **ALL) == 0


def test_pending_labels_expire_after_their_ttl(rec):
    rec.feedback([LabelItem("ghost", "yes")])
    rec.clock_.t += 101
    assert rec.sweep()["expired"] == 1
    assert value(rec, "ecoserve_labels_expired_total") == 1 and value(rec, "ecoserve_labels_pending") == 0
    rec.record([outcome(77, (1, 1, 1), rec.clock_.t)])
    assert value(rec, "ecoserve_labeled_outcomes_total", ecosystem="eco", source="observed", **ALL) == 0


def test_restart_rebuilds_counts_without_double_counting(store_url):
    clock = Clock()
    store = open_store(store_url)
    r1 = Recorder({"eco": SPEC}, store, clock=clock)
    rng = np.random.default_rng(1)
    outs = [outcome(i, rng.integers(0, 2, 3), clock.t, rng.choice(["female", "male"])) for i in range(50)]
    r1.record(outs)
    r1.feedback([LabelItem(f"r{i}", int(rng.integers(0, 2))) for i in range(0, 50, 2)])
    r1.feedback([LabelItem("r0", "yes"), LabelItem("r0", "no")])  # corrections must not change counts
    # (the recorder's CPU counter is this process's, like process_cpu_seconds_total: it restarts at 0)
    def counters(r: Recorder) -> dict:
        return {k: v for k, v in samples(r).items()
                if ("_total" in k[0] or "_bucket" in k[0]) and not k[0].startswith("ecoserve_recorder_cpu")}

    before = counters(r1)
    store.close()
    r2 = Recorder({"eco": SPEC}, open_store(store_url), clock=clock)  # a new process, same store
    after = counters(r2)
    assert after == before  # every counter: rebuilt from outcomes, labels and persisted event counts
    assert value(r2, "ecoserve_label_corrections_total", ecosystem="eco", from_source="observed", to_source="observed") >= 1
    # a resent batch (the gateway retrying after the crash) is not counted again
    r2.record(outs[:10])
    assert value(r2, "ecoserve_outcomes_total", ecosystem="eco") == 50
    assert value(r2, "ecoserve_outcomes_duplicate_id_total") == 10
    r2.store.close()


def test_every_declared_metric_is_exposed_and_promtool_accepts_it(rec, tmp_path):
    rec.record([outcome(i, (i % 2, 1, 0), rec.clock_.t) for i in range(5)])
    rec.feedback([LabelItem(f"r{i}", "yes") for i in range(5)])
    text = exposition(rec).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    for name, (kind, _, _) in METRICS.items():
        assert (name.removesuffix("_total") if kind == "counter" else name) in names, name
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make test installs Debian's prometheus package)")
    (tmp_path / "m.txt").write_text(text)
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_row_encoder_writes_what_json_dumps_would():
    import json

    from telemetry.records import PAYLOAD_FIELDS, ROW_COLUMNS, RowEncoder

    cases = [
        outcome(1, (1, -1, 0), 5.0, sex="female"),
        Outcome("r2", "eco", 6.5, MEMBERS, ("1", "2", "3"), tuple(np.array([2, 0, 1])), 2, 1,
                tuple(np.array([0.25, 0.5, 0.25])), 1, "epsilon_greedy", False, {"z": "ü", "a": 'q"x'}, "fp"),
        Outcome("r3", "eco", 7.0, MEMBERS, ("1", "1", "1"), (0, 0, 0), 0, 0, (1.0, 0, 0), 0, "direct", True, {}, ""),
        Outcome("r4", "eco", 7.5, MEMBERS, ("1", "1", "1"), (0, 0, 0), 0, 0, (1.0, 0, 0), 0, "direct", True, {},
                'a"b\\ü'),  # a client's fingerprint text that needs escaping
        Outcome("r5", "eco", 8.0, MEMBERS, ("1", "1", "1"), (0, 1, -1), 0, 0, (1.0, 0, 0), 0, "primary", False, {},
                "ab12", (0.91234567, 1e-5, float("nan"))),  # scores: 4 significant digits, NaN as null
        Outcome("r6", "eco", 8.5, MEMBERS, ("1", "1", "1"), (0, 1, 2), 0, 0, (1.0, 0, 0), 0, "primary", False, {},
                "x y", (0.5, float("inf"), 0.25)),
    ]
    contexts: list[tuple[str, str, str]] = []

    def context_id(members: str, versions: str, policy: str) -> int:
        key = (members, versions, policy)
        if key not in contexts:
            contexts.append(key)
        return contexts.index(key)

    enc = RowEncoder(max_cache=2)  # tiny: the cache is cleared on the way
    for _ in range(2):
        for o, row in zip(cases, enc.rows_of_fields([outcome_fields(c) for c in cases], context_id)):
            got = dict(zip(ROW_COLUMNS, row))
            assert (got["request_id"], got["ecosystem"], got["created_at"]) == (o.request_id, o.ecosystem, o.time_s)
            assert contexts[got["context"]] == (json.dumps(list(o.members)), json.dumps(list(o.versions)), o.policy)
            assert got["propensities"] == json.dumps([float(v) for v in o.propensities])
            assert got["groups"] == json.dumps({str(k): str(v) for k, v in o.groups.items()}, sort_keys=True)
            want = {
                "predictions": [int(v) for v in o.predictions], "served": o.served, "intended": o.intended,
                "greedy": o.greedy, "direct": o.direct, "fingerprint": o.input_fingerprint,
            }
            if o.scores:
                want["scores"] = [float(f"{v:.4g}") if np.isfinite(v) else None for v in o.scores]
            payload = json.loads(got["payload"])
            assert dict(zip(PAYLOAD_FIELDS, payload)) == want
            assert [type(v) for v in payload] == [type(want[f]) for f in PAYLOAD_FIELDS[:len(payload)]]
    assert len(contexts) == 4


def test_outcome_ids_already_stored_are_skipped(store_url):
    """SQLite: the change count tells the common case; a batch with stored ids is rolled back to
    its savepoint and inserted again without them. PostgreSQL: ON CONFLICT DO NOTHING RETURNING."""
    store = open_store(store_url)
    try:
        a, b = outcome(1, (1, 1, 0), 5.0), outcome(2, (0, 1, 0), 5.0)
        assert store.insert_outcomes([a, b]) == {"r1", "r2"}
        again = outcome(1, (0, 0, 0), 6.0)  # same id, different content: the stored one stays
        assert store.insert_outcomes([again, outcome(3, (1, 0, 0), 6.0), outcome(3, (1, 1, 1), 6.0)]) == {"r3"}
        got = store.get_outcomes(["r1", "r3"])
        assert got["r1"].predictions == [1, 1, 0] and got["r3"].predictions == [1, 0, 0]
        assert store.count_outcomes() == 3
        # a batch of only stored ids, with the ledger progress in the same transaction
        assert store.insert_outcomes([outcome(2, (1, 1, 1), 7.0)], ("led1", {"t": 4})) == set()
        assert store.count_outcomes() == 3 and store.get_outcomes(["r2"])["r2"].predictions == [0, 1, 0]
        # more than one statement's worth (500 rows) with a stored id in the second chunk
        many = [outcome(i, (1, 0, 1), 8.0) for i in range(10, 1210)] + [outcome(3, (0, 0, 0), 8.0)]
        assert store.insert_outcomes(many) == {f"r{i}" for i in range(10, 1210)}
        assert store.count_outcomes() == 1203 and store.get_outcomes(["r3"])["r3"].predictions == [1, 0, 0]
    finally:
        store.close()


def test_an_id_repeated_within_one_hand_over_is_counted_once(rec):
    """The store keeps the first of repeated ids in a batch; the counts follow it (the second copy,
    with other predictions, is counted as a duplicate id, not as an outcome)."""
    t = rec.clock_.t
    got = rec.record([outcome(1, (1, 1, 1), t), outcome(1, (0, 0, 0), t), outcome(2, (1, 0, 1), t)])
    assert got["inserted"] == 2
    assert value(rec, "ecoserve_outcomes_total", ecosystem="eco") == 2
    assert value(rec, "ecoserve_outcomes_duplicate_id_total") == 1
    assert value(rec, "ecoserve_unanimous_total", ecosystem="eco", **ALL) == 1  # r1 as first sent


def test_reward_stats_count_observed_and_assumed_labels_per_member(rec):
    """What every hand-over sends back to the policies: per member, (correct, wrong) over labeled
    outcomes of both sources, equal to the sum of the two sources' counts."""
    t = rec.clock_.t
    rec.record([outcome(i, (i % 2, 1, 0), t) for i in range(10)])
    rec.feedback([LabelItem(f"r{i}", "yes") for i in range(6)])
    rec.clock_.t += 601  # the rest become assumed "no"
    rec.sweep()
    ok, wrong = rec.reward_stats("eco")
    labels = rec.snapshot().ecosystems["eco"].labels
    total = labels["observed"] + labels["assumed"]
    assert ok == [int(v) for v in total.member_correct]
    assert wrong == [int(v) for v in total.member_n - total.member_correct]
    # by hand: members predict (i % 2, 1, 0); labels yes (1) for r0..r5, no (0) for r6..r9
    assert ok == [3 + 2, 6, 4] and wrong == [3 + 2, 4, 6]


def test_insert_statements_come_in_ten_sizes(tmp_path):
    """Every batch is cut into chunks of 500 and powers of two, in order and complete, so the
    multi-row INSERTs stay compiled in the statement cache whatever the batch sizes."""
    from telemetry.store.rows import sized_chunks

    sizes = {500} | {2**k for k in range(9)}
    for n in [0, 1, 2, 3, 37, 255, 256, 499, 500, 501, 1000, 1234, 2999]:
        chunks = list(sized_chunks(list(range(n))))
        assert [v for c in chunks for v in c] == list(range(n))
        assert {len(c) for c in chunks} <= sizes and len(chunks) <= n // 500 + 9
    store = open_store(f"sqlite:///{tmp_path / 'o.db'}")
    try:
        start = 0
        for n in [37, 255, 499, 1234, 3, 777]:
            assert store.insert_outcomes([outcome(i, (1, 0, 1), 5.0) for i in range(start, start + n)]) == {
                f"r{i}" for i in range(start, start + n)}
            start += n
        assert store.count_outcomes() == start
        assert set(store._inserts) <= sizes
    finally:
        store.close()


def test_recorder_cpu_is_counted_per_operation(rec):
    """`ecoserve_recorder_cpu_seconds_total{operation}`: the recorder's own CPU, where it did work."""
    def cpu(op: str) -> float:
        return samples(rec)[("ecoserve_recorder_cpu_seconds_total", (("operation", op),))]

    assert cpu("record") == cpu("feedback") == cpu("sweep") == 0.0
    rec.record([outcome(i, (i % 2, 1, 0), rec.clock_.t) for i in range(2000)])
    after_record = cpu("record")
    assert after_record > 0 and cpu("feedback") == 0.0
    rec.feedback([LabelItem(f"r{i}", "yes") for i in range(2000)])
    assert cpu("feedback") > 0 and cpu("record") == after_record
    rec.sweep()
    assert cpu("sweep") > 0
    rec.record([outcome(i, (0, 0, 0), rec.clock_.t) for i in range(2000, 4000)])
    assert cpu("record") > after_record


def test_sqlite_wal_is_checkpointed_in_the_background(tmp_path):
    """Writers no longer checkpoint the WAL themselves (only past a large safety limit, far above
    what this test writes): a background thread does, with no call from the recorder; close()
    stops it."""
    import sqlite3
    import time

    def in_db_file() -> int:  # an immutable reader ignores the WAL: it sees only checkpointed pages
        ro = sqlite3.connect(f"file:{tmp_path / 'o.db'}?immutable=1", uri=True)
        try:
            return int(ro.execute("SELECT count(*) FROM ecoserve_outcomes WHERE label_source = 'observed'").fetchone()[0])
        except sqlite3.DatabaseError:  # read while a checkpoint was writing those pages
            return -1
        finally:
            ro.close()

    store = open_store(f"sqlite:///{tmp_path / 'o.db'}")
    try:
        rec = Recorder({"eco": SPEC}, store, clock=Clock())
        rec.record([outcome(i, (1, 0, 1), 1_000_000.0) for i in range(3000)])
        rec.feedback([LabelItem(f"r{i}", "yes") for i in range(3000)])
        deadline = time.monotonic() + 10
        while in_db_file() < 3000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_db_file() == 3000
        thread = store._checkpointer._thread
        assert thread.is_alive()
    finally:
        store.close()
    assert not thread.is_alive()


# ------------------------------------------------------------------ regression ecosystems
REG = EcosystemSpec(
    name="reg", members=MEMBERS, classes=tuple(f"b{i}" for i in range(10)), subgroups={"sex": ("female", "male")},
    assume_label_after_s=600.0, assumed_label=0.0, task="regression", tolerance=10.0, bin_low=0.0, bin_width=10.0,
)


def reg_outcome(i: int, values, t: float, sex: str = "female", served: int = 0) -> Outcome:
    return Outcome(f"v{i}", "reg", t, MEMBERS, ("1", "1", "1"), tuple(values), served, served,
                   (0.5, 0.3, 0.2), 0, "epsilon_greedy", False, {"sex": sex}, f"fp{i}")


def test_regression_codes_bin_values_and_mark_missing_ones():
    raw = np.array([[0.0, 9.999, 10.0], [-5.0, 99.9, 1e6], [np.nan, 55.0, 100.0]])
    assert REG.codes(raw).tolist() == [[0, 0, 1], [0, 9, 9], [-1, 5, 9]]  # beyond the range: the edge bins
    for bad in ("12.5", True, float("nan"), float("inf"), None, [1.0]):
        with pytest.raises(ValueError, match="must be"):
            REG.label_value(bad)
    assert REG.label_value(7) == 7.0 and REG.label_value(-3.25) == -3.25  # any finite number is a true value


def test_regression_counters_match_definitions_and_survive_a_restart(store_url):
    """Correct = |value - label| <= tolerance; label-free metrics compare bins; a missing value
    (None) is excluded, never a failure; counts rebuilt from the store after a restart."""
    clock = Clock()
    store = open_store(store_url)
    rec = Recorder({"reg": REG}, store, clock=clock)
    rng = np.random.default_rng(5)
    n = 300
    truth = rng.uniform(0, 100, n)
    values = truth[:, None] + rng.normal(0, 9, (n, 3))
    values[rng.random((n, 3)) < 0.03] = np.nan  # members that failed on a row
    values[0] = [truth[0] + 10.0, truth[0] - 10.0, truth[0] + 10.5]  # on and just past the tolerance
    sexes = rng.choice(["female", "male"], n)
    rows = [tuple(None if np.isnan(v) else float(v) for v in values[i]) for i in range(n)]
    rec.record([reg_outcome(i, rows[i], clock.t, sexes[i]) for i in range(n)])
    res = rec.feedback([LabelItem(f"v{i}", float(truth[i])) for i in range(n)] + [LabelItem("v1", float(truth[1]))])
    assert res[-1].status == "duplicate"
    assert rec.feedback([LabelItem("v1", float(truth[1]) + 1)])[0].status == "correction"
    with pytest.raises(FeedbackError, match="item 0: label: must be a finite number"):
        rec.feedback([LabelItem("v2", "high")])
    stored = rec.store.get_outcomes(["v0"])["v0"]
    assert stored.predictions == list(values[0])  # values stored exactly
    missing = np.isnan(values)
    correct = np.abs(values - truth[:, None]) <= 10.0
    assert correct[0].tolist() == [True, True, False]
    complete = ~missing.any(axis=1)
    k = (~correct[complete]).sum(axis=1)
    bins = np.clip(np.floor(values / 10.0), 0, 9)
    obs = {"ecosystem": "reg", "source": "observed", **ALL}
    assert value(rec, "ecoserve_labeled_outcomes_total", **obs) == n
    for kk in range(4):
        assert value(rec, "ecoserve_failures_per_instance_total", k=str(kk), **obs) == (k == kk).sum()
    for a, m in enumerate(MEMBERS):
        assert value(rec, "ecoserve_member_correct_total", member=m, **obs) == (correct[:, a] & ~missing[:, a]).sum()
        assert value(rec, "ecoserve_member_labeled_total", member=m, **obs) == (~missing[:, a]).sum()
    assert value(rec, "ecoserve_pair_agreements_total", ecosystem="reg", member_a="a", member_b="c", **ALL) == (
        bins[complete, 0] == bins[complete, 2]).sum()
    male = sexes == "male"
    assert value(rec, "ecoserve_failures_per_instance_total", k="3", ecosystem="reg", source="observed",
                 subgroup="sex", subgroup_value="male") == (k[male[complete]] == 3).sum()
    sfr = value(rec, "ecoserve_window_systemic_failure_ratio", ecosystem="reg", **ALL)
    assert sfr == pytest.approx((k == 3).mean())
    before = samples(rec)
    store.close()
    again = Recorder({"reg": REG}, open_store(store_url), clock=clock)
    after = samples(again)
    for key, v in before.items():
        if key[0].endswith("_total") and not key[0].startswith("ecoserve_recorder_cpu"):
            assert after.get(key) == v, key
    # assumed labels are values too
    clock.t += 700
    again.record([reg_outcome(n + 1, (1.0, 2.0, 30.0), clock.t - 650)])
    assert again.sweep()["assumed"] == 1
    assert value(again, "ecoserve_member_correct_total", ecosystem="reg", member="c", source="assumed", **ALL) == 0
    assert value(again, "ecoserve_member_correct_total", ecosystem="reg", member="a", source="assumed", **ALL) == 1
    again.store.close()


def test_held_labels_are_checked_counted_and_never_take_others_down(store_url):
    """A label for an outcome not stored yet: 422 now if no served ecosystem could take it; held
    otherwise (one per id, the newest). When the outcome arrives, a held label its ecosystem cannot
    take is dropped and counted, and the other labels of that hand-over still join."""
    clock = Clock()
    rec = Recorder({"eco": SPEC, "reg": REG}, open_store(store_url), clock=clock)
    with pytest.raises(FeedbackError, match=r"item 1: label: no served ecosystem takes this label \(eco: 'high' is not a class"):
        rec.feedback([LabelItem("r1", "yes"), LabelItem("r2", "high")])
    assert value(rec, "ecoserve_labels_pending") == 0  # nothing held from the rejected request
    rec.feedback([LabelItem("r1", 12.5), LabelItem("r2", "no")])  # 12.5: a value for reg, no class of eco
    rec.feedback([LabelItem("r2", "yes")])  # the same id again: the newest label is held
    assert value(rec, "ecoserve_labels_pending") == 2
    stats = rec.record([outcome(1, (1, 1, 0), clock.t), outcome(2, (1, 0, 0), clock.t)])
    assert stats["joined_pending"] == 1
    assert value(rec, "ecoserve_labels_rejected_total", reason="label") == 1 and value(rec, "ecoserve_labels_pending") == 0
    assert rec.store.get_outcomes(["r2"])["r2"].label == 1.0  # "yes", the newest
    assert rec.store.get_outcomes(["r1"])["r1"].label is None
    rec.record([Outcome("x1", "nope", clock.t, MEMBERS, ("1",) * 3, (0, 0, 0), 0, 0, (1.0, 0, 0), 0, "primary",
                        False, {}, "")])
    assert value(rec, "ecoserve_outcomes_unknown_ecosystem_total") == 1
    rec.store.close()


def test_a_member_added_removed_or_reordered_keeps_the_recorder_up(store_url):
    """Outcomes stored under one member list, counted by a recorder configured with another (a
    member added, removed, reordered; or a gateway still on the old config): mapped by name, a
    member they lack is a missing output (never a failure), one no longer served is left out. It
    used to make the recorder fail at start (its rebuild could not reshape the stored rows)."""
    clock = Clock()
    store = open_store(store_url)
    r1 = Recorder({"eco": SPEC}, store, clock=clock)
    rng = np.random.default_rng(3)
    preds = rng.integers(0, 2, (40, 3))
    labels = rng.integers(0, 2, 40)
    r1.record([outcome(i, preds[i], clock.t, served=i % 3) for i in range(40)])
    r1.feedback([LabelItem(f"r{i}", int(labels[i])) for i in range(20)])
    store.close()
    # "b" removed, "d" added, the order changed
    spec2 = EcosystemSpec(name="eco", members=("c", "a", "d"), classes=("no", "yes"), subgroups={"sex": ("female", "male")})
    r2 = Recorder({"eco": spec2}, open_store(store_url), clock=clock)
    assert value(r2, "ecoserve_outcomes_total", ecosystem="eco") == 40
    assert value(r2, "ecoserve_member_missing_outputs_total", ecosystem="eco", member="d") == 40  # never ran
    assert value(r2, "ecoserve_member_missing_outputs_total", ecosystem="eco", member="a") == 0
    # served counts follow the names; rows served by "b" (gone) are left out
    assert value(r2, "ecoserve_served_total", ecosystem="eco", member="a") == len(range(0, 40, 3))
    assert value(r2, "ecoserve_served_total", ecosystem="eco", member="c") == len(range(2, 40, 3))
    obs = {"ecosystem": "eco", "source": "observed", **ALL}
    assert value(r2, "ecoserve_labeled_outcomes_total", **obs) == 20
    assert value(r2, "ecoserve_complete_outcomes_total", **obs) == 0  # "d" is unknown on every old outcome
    for name, col in (("a", 0), ("c", 2)):
        want = (preds[:20, col] == labels[:20]).sum()
        assert value(r2, "ecoserve_member_correct_total", member=name, **obs) == want
    assert value(r2, "ecoserve_pair_agreements_total", ecosystem="eco", member_a="c", member_b="a", **ALL) == 0  # "d" missing: no row counts
    # new labels for old outcomes, and a hand-over from a gateway still on the old config, both count
    r2.feedback([LabelItem(f"r{i}", int(labels[i])) for i in range(20, 40)])
    assert value(r2, "ecoserve_labeled_outcomes_total", **obs) == 40
    r2.record([outcome(100, (1, 0, 1), clock.t, served=0)])
    assert value(r2, "ecoserve_outcomes_total", ecosystem="eco") == 41
    assert value(r2, "ecoserve_served_total", ecosystem="eco", member="a") == len(range(0, 40, 3)) + 1
    r2.store.close()


def test_window_ratios_carry_wilson_intervals(rec):
    """Each windowed ratio's _lower/_upper gauges are the 95% Wilson interval of its own count."""
    from telemetry.estimation import wilson

    # 12 outcomes: 3 where every member is wrong, 6 where every member is right, 3 mixed
    preds = [(1, 1, 1)] * 3 + [(0, 0, 0)] * 6 + [(0, 1, 0)] * 3
    rec.record([outcome(i, p, rec.clock(), "female") for i, p in enumerate(preds)])
    rec.feedback([LabelItem(f"r{i}", "no") for i in range(12)])
    lo, hi = wilson(3, 12)
    assert value(rec, "ecoserve_window_systemic_failure_ratio", ecosystem="eco", **ALL) == pytest.approx(3 / 12)
    assert value(rec, "ecoserve_window_systemic_failure_ratio_lower", ecosystem="eco", **ALL) == pytest.approx(float(lo))
    assert value(rec, "ecoserve_window_systemic_failure_ratio_upper", ecosystem="eco", **ALL) == pytest.approx(float(hi))
    base = value(rec, "ecoserve_window_systemic_failure_baseline_ratio", ecosystem="eco", **ALL)
    assert value(rec, "ecoserve_window_systemic_failure_excess_ratio_lower", ecosystem="eco", **ALL) == pytest.approx(
        float(lo) - base)
    lo, hi = wilson(9, 12)  # unanimity: 9 of 12 outcomes had one answer
    assert value(rec, "ecoserve_window_unanimity_ratio_lower", ecosystem="eco", **ALL) == pytest.approx(float(lo))
    lo, hi = wilson(6, 12)  # consistent success
    assert value(rec, "ecoserve_window_consistent_success_ratio_upper", ecosystem="eco", **ALL) == pytest.approx(
        float(hi))
    acc_b = value(rec, "ecoserve_window_member_accuracy_ratio", ecosystem="eco", member="b")
    lo, hi = wilson(round(acc_b * 12), 12)
    assert value(rec, "ecoserve_window_member_accuracy_ratio_lower", ecosystem="eco", member="b") == pytest.approx(
        float(lo))


def test_a_held_label_survives_a_store_failure_between_storing_and_joining(rec, monkeypatch):
    """A label posted before its outcome is held. If the store fails after the outcome is stored but
    before the held label is applied, the hand-over fails and the gateway sends it again: the
    outcome is then a duplicate, and its held label must still join (it once was deleted first,
    and lost)."""
    from sqlalchemy.exc import OperationalError

    assert rec.feedback([LabelItem("r1", "yes")])[0].status == "pending"
    real = rec.store.apply_labels
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("UPDATE ...", {}, Exception("the server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rec.store, "apply_labels", flaky)
    with pytest.raises(OperationalError):
        rec.record([outcome(1, (0, 1, 1), rec.clock())])
    assert rec.store.get_outcomes(["r1"])["r1"].label is None  # stored, not yet labeled
    assert rec.store.count_pending() == 1  # the held label is still held
    rec.record([outcome(1, (0, 1, 1), rec.clock())])  # the gateway's re-send
    assert rec.store.get_outcomes(["r1"])["r1"].label == 1.0
    assert rec.store.count_pending() == 0
    assert value(rec, "ecoserve_labeled_outcomes_total", ecosystem="eco", source="observed", **ALL) == 1
