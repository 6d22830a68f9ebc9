"""Candidate versions in shadow (`candidates` in an ecosystem's config): recorded beside the
serving version, never served, kept out of the deployed ecosystem's counts, and their flips
counted as labels arrive, equal to a count by hand from ONNX Runtime's own outputs. The real HTTP
app and ONNX Runtime members, a real recorder (SQLite); no Ray (tests/test_prometheus_e2e.py
runs a candidate through the real Ray app)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import local_app, serving_args
from prometheus_client.parser import text_string_to_metric_families
from test_risk_in_responses import post

from models.heldout import load_heldout
from serving.config import ConfigError, load_serve_file, preflight
from serving.recording.host import RecorderHost
from telemetry.flips import CandidateFlips, delta_interval
from telemetry.version_change import VersionChangeCounts

CREDIT = ["logreg", "forest", "gboost", "mlp", "knn"]


def onnx_labels(repo: Path, eco: str, member: str, version: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(repo / f"{eco}/{member}/{version}/model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["label"], {"input": x})[0].reshape(-1).astype(np.int64)


def samples(host: RecorderHost, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for fam in text_string_to_metric_families(host.metrics().decode()):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(host: RecorderHost, name: str, **labels: str) -> float | None:
    for key, v in samples(host, name).items():
        if dict(key) == labels:
            return v
    return None


def build(serving_repo: Path, db: Path, eco_cfg: dict[str, Any]) -> tuple[Any, RecorderHost]:
    args = serving_args(serving_repo)
    args["ecosystems"] = {"credit": {"policy": {"kind": "primary", "primary": "logreg"}, **eco_cfg}}
    args["telemetry"] = {"store_url": f"sqlite:///{db}"}
    args["limits"] = {"max_rows_per_request": 1000}
    app, host = local_app(args)
    return app, host


def test_flips_equal_a_count_by_hand(serving_repo: Path, tmp_path: Path) -> None:
    held = load_heldout(serving_repo / "credit")
    x, y = held.X.astype(np.float32), held.y.astype(np.int64)
    groups = [{"sex": str(s), "age_group": str(a)} for s, a in zip(held.groups["sex"], held.groups["age_group"])]
    app, host = build(serving_repo, tmp_path / "o.db", {"candidates": {"gboost": "2"}})
    try:
        body = {"id": "r", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.reshape(-1).tolist()}],
                "parameters": {"subgroups": groups}}
        r = post(app, "/v2/models/credit/infer", body)
        assert r.status_code == 200, r.text
        assert set(r.json()["parameters"]["served_members"]) == {"logreg"}  # a candidate never serves
        ids = r.json()["parameters"]["request_ids"]
        preds = np.stack([onnx_labels(serving_repo, "credit", m, "1", x) for m in CREDIT], axis=1)
        cand = onnx_labels(serving_repo, "credit", "gboost", "2", x)
        # recorded beside the serving version, with both versions named
        stored = host.store.get_outcomes(ids)
        for i, rid in enumerate(ids):
            (a, current, version, out, score), = stored[rid].candidates
            assert (CREDIT[a], current, version, out) == ("gboost", "1", "2", int(cand[i]))
            assert 0.0 <= score <= 1.0
        key = {"ecosystem": "credit", "member": "gboost", "version": "1", "candidate": "2"}
        assert value(host, "ecoserve_candidate_outcomes_total", **key) == len(y)
        assert value(host, "ecoserve_candidate_agreements_total", **key) == int((cand == preds[:, 2]).sum())
        # labels arrive: flips, by hand (telemetry.version_change's offline count, the same definitions)
        got = post(app, "/v2/feedback", {"labels": [{"request_id": i, "label": int(v)} for i, v in zip(ids, y)]})
        assert got.status_code == 200, got.text
        correct = (preds == y[:, None]).astype(int)
        others = np.delete(correct, 2, axis=1)

        def check(sel: np.ndarray, sg: str, sv: str) -> None:
            hand = VersionChangeCounts.from_arrays(correct[sel, 2], (cand == y).astype(int)[sel], others[sel])
            labels = {**key, "subgroup": sg, "subgroup_value": sv}
            assert value(host, "ecoserve_candidate_labeled_total", **labels) == hand.n == sel.sum()
            assert value(host, "ecoserve_candidate_improvements_total", **labels) == hand.improvements
            assert value(host, "ecoserve_candidate_regressions_total", **labels) == hand.regressions
            assert value(host, "ecoserve_candidate_improvements_on_systemic_failures_total", **labels) == \
                hand.improvements_on_systemic
            assert value(host, "ecoserve_candidate_correct_total", **labels) == int((cand == y)[sel].sum())
            assert value(host, "ecoserve_candidate_current_correct_total", **labels) == int(correct[sel, 2].sum())
            nfr = value(host, "ecoserve_candidate_negative_flip_ratio", **labels)
            assert nfr == pytest.approx(hand.regressions / hand.n)
            lo = value(host, "ecoserve_candidate_negative_flip_ratio_lower", **labels)
            hi = value(host, "ecoserve_candidate_negative_flip_ratio_upper", **labels)
            assert lo is not None and hi is not None and lo <= nfr <= hi
            d = value(host, "ecoserve_candidate_accuracy_delta", **labels)
            assert d == pytest.approx(((cand == y)[sel].mean()) - correct[sel, 2].mean())

        check(np.ones(len(y), dtype=bool), "all", "all")
        sex = np.asarray(held.groups["sex"]).astype(str)
        for v in ("female", "male"):
            check(sex == v, "sex", v)
        both = np.char.add(np.char.add(sex, "&"), np.asarray(held.groups["age_group"]).astype(str))
        check(both == "female&young", "sex&age_group", "female&young")
        # the deployed ecosystem's counts know nothing of the candidate
        systemic = int((preds != y[:, None]).all(axis=1).sum())
        assert value(host, "ecoserve_systemic_failures_total", ecosystem="credit", source="observed",
                     subgroup="all", subgroup_value="all") == systemic
        before = samples(host, "ecoserve_candidate_improvements_total")
    finally:
        host.close()
    # a restarted recorder rebuilds every flip count from the store
    _, again = build(serving_repo, tmp_path / "o.db", {"candidates": {"gboost": "2"}})
    try:
        assert samples(again, "ecoserve_candidate_improvements_total") == before
    finally:
        again.close()


def test_versions_pin_what_a_member_serves(serving_repo: Path, tmp_path: Path) -> None:
    held = load_heldout(serving_repo / "credit")
    x = held.X[:20].astype(np.float32)
    app, host = build(serving_repo, tmp_path / "o.db", {"versions": {"gboost": "2"},
                                                          "policy": {"kind": "primary", "primary": "gboost"}})
    try:
        r = post(app, "/v2/models/credit/infer", {"id": "p", "inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"])
        assert (got == onnx_labels(serving_repo, "credit", "gboost", "2", x)).all()
        assert host.store.get_outcomes(["p/0"])["p/0"].candidates is None
    finally:
        host.close()


@pytest.mark.parametrize("eco_cfg, message", [
    ({"candidates": {"gboost": "9"}}, "candidates.gboost: no version '9' (the manifest lists '2', '1')"),
    ({"candidates": {"gboost": "1"}}, "candidates.gboost: version '1' is the one it serves already"),
    ({"versions": {"gboost": "7"}}, "versions.gboost: no version '7'"),
    ({"candidates": {"nope": "1"}}, "candidates.nope: 'nope' is not a member"),
    ({"members": ["logreg", "forest"], "candidates": {"gboost": "2"}}, "candidates.gboost: the member is not run here"),
    ({"candidate_share": 0}, "candidate_share"),
])
def test_bad_candidate_configs_are_refused(serving_repo: Path, tmp_path: Path, eco_cfg: dict[str, Any],
                                           message: str) -> None:
    """What `ecoserve serve` and `ecoserve check` say before anything starts."""
    from conftest import write_serve_file

    from ecoserve.server import free_port

    args = serving_args(serving_repo)
    args["ecosystems"] = {"credit": {"policy": {"kind": "primary", "primary": "logreg"}, **eco_cfg}}
    args["telemetry"] = {"store_url": f"sqlite:///{tmp_path / 'o.db'}"}
    with pytest.raises(ConfigError) as err:
        preflight(load_serve_file(write_serve_file(tmp_path / "serve.yaml", free_port(), args)), check_port=False)
    assert message in str(err.value)


def test_delta_interval_covers() -> None:
    """The paired interval of the accuracy delta covers the true delta ~95% of the time (seed 0)."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(1000):
        u = rng.random(400)
        imp = int((u < 0.06).sum())
        reg = int(((u >= 0.06) & (u < 0.10)).sum())
        r = delta_interval(imp, reg, 400)
        assert r is not None
        hits += r[1] <= 0.02 <= r[2]
    assert 930 <= hits <= 970, hits


def test_flip_counts_add() -> None:
    from telemetry.counts import EcosystemShape

    shape = EcosystemShape(members=("a", "b"), n_classes=2)
    one, two = CandidateFlips(shape), CandidateFlips(shape)
    correct = np.array([[0, 0], [1, 0], [0, 1]])
    one.count_labeled([("a", "1", "2")] * 3, np.zeros(3, dtype=int), correct, np.array([1, 0, 1]), None)
    two.count_labeled([("a", "1", "2")], np.zeros(1, dtype=int), correct[:1], np.array([1]), None)
    rows = {k: c for k, _, _, c in (one + two).rows()}
    assert rows[("a", "1", "2")] == {"n": 4, "current_correct": 1, "candidate_correct": 3, "improvements": 3,
                                     "regressions": 1, "improvements_on_systemic": 2}


def test_candidate_share_runs_the_candidate_on_part_of_the_requests(serving_repo: Path, tmp_path: Path) -> None:
    held = load_heldout(serving_repo / "credit")
    app, host = build(serving_repo, tmp_path / "o.db", {"candidates": {"gboost": "2"}, "candidate_share": 0.5})
    try:
        for i in range(200):
            x = held.X[i % len(held.X)][None, :].astype(np.float32)
            r = post(app, "/v2/models/credit/infer", {"id": f"s{i}", "inputs": [
                {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
            assert r.status_code == 200, r.text
        got = host.store.get_outcomes([f"s{i}" for i in range(200)])
        ran = sum(1 for o in got.values() if o.candidates)
        assert 60 <= ran <= 140, ran  # binomial(200, 0.5): outside this, p < 1e-8
        key = {"ecosystem": "credit", "member": "gboost", "version": "1", "candidate": "2"}
        assert value(host, "ecoserve_candidate_outcomes_total", **key) == ran
    finally:
        host.close()
