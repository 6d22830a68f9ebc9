"""Label-free estimates streamed by the recorder (telemetry.recorder.Recorder.refresh_estimates):
members' scores recorded with each outcome, an estimator fitted on labeled outcomes from the
store and kept there (versioned), estimates for the outcomes still waiting for labels (overall
and per subgroup) equal to the same estimator run offline, and the estimate's error measured
once their labels arrive. A real recorder over SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_estimation import simulate

from telemetry.estimation import SystemicEstimator
from telemetry.metrics import exposition
from telemetry.recorder import LabelItem, Recorder
from telemetry.records import Outcome
from telemetry.spec import EcosystemSpec
from telemetry.store import open_store

MEMBERS = ("a", "b", "c", "d")
SPEC = EcosystemSpec(name="eco", members=MEMBERS, classes=tuple(str(i) for i in range(10)),
                     subgroups={"sex": ("female", "male")})
T0 = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0 + 50_000

    def __call__(self) -> float:
        return self.t


def outcomes(prefix, preds, scores, served, t0, sexes):
    return [Outcome(f"{prefix}{i}", "eco", t0 + i * 0.01, MEMBERS, ("1",) * 4, tuple(int(v) for v in preds[i]),
                    int(served[i]), int(served[i]), (1.0, 0.0, 0.0, 0.0), 0, "primary", False, {"sex": sexes[i]},
                    f"{i:08x}", tuple(float(s) for s in scores[i]))
            for i in range(len(preds))]


def stored(sim):
    """A simulated batch with its scores as the store keeps them (4 significant digits)."""
    preds, scores, served, correct = sim
    return preds, np.vectorize(lambda v: float(f"{v:.4g}"))(scores), served, correct


def truth_of(preds, correct):
    """A label consistent with `correct`: the right member's answer, else a class nobody gave."""
    out = []
    for p, c in zip(preds, correct):
        right = [int(v) for v, ok in zip(p, c) if ok]
        out.append(right[0] if right else next(k for k in range(10) if k not in set(p.tolist())))
    return out


def samples(rec):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(exposition(rec).decode()) for s in f.samples}


@pytest.fixture
def rec(store_url):
    clock = Clock()
    r = Recorder({"eco": SPEC}, open_store(store_url), clock=clock, window_s=1e9, estimate_reference=5000)
    r.clock_ = clock
    yield r
    r.store.close()


@pytest.mark.parametrize("page", [5000, 700], ids=["one page", "pages of 700"])
def test_estimates_stream_and_are_checked_when_labels_arrive(rec, store_url, page, monkeypatch):
    """Read in one page or in many (the recorder keeps only sums and arrays): the same numbers."""
    monkeypatch.setattr("telemetry.recorder.ESTIMATE_PAGE", page)
    rng = np.random.default_rng(20261202)
    ref = stored(simulate(3000, 0.15, rng))
    sexes = np.where(rng.random(3000) < 0.5, "female", "male")
    rec.record(outcomes("ref", ref[0], ref[1], ref[2], T0, sexes))
    truth = truth_of(ref[0], ref[3])
    rec.feedback([LabelItem(f"ref{i}", truth[i]) for i in range(3000)])
    # now: shifted, no labels yet
    now = stored(simulate(2000, 0.5, rng))
    sexes_now = np.where(rng.random(2000) < 0.5, "female", "male")
    rec.record(outcomes("now", now[0], now[1], now[2], T0 + 100, sexes_now))
    assert rec.refresh_estimates() == {"eco": 2000}
    # the same estimator, fitted offline on the same reference (the store hands it newest first)
    order = np.arange(3000)[::-1]
    offline = SystemicEstimator.fit(MEMBERS, ref[0][order], ref[1][order], ref[2][order], ref[3][order])
    assert offline is not None
    want = offline.estimate(now[0], now[1], now[2])
    m = samples(rec)
    all_ = (("ecosystem", "eco"), ("subgroup", "all"), ("subgroup_value", "all"))
    assert m[("ecoserve_estimated_systemic_failure_ratio", all_)] == pytest.approx(want.value, abs=1e-7)
    assert m[("ecoserve_estimated_systemic_failure_ratio_lower", all_)] == pytest.approx(want.lower, abs=1e-7)
    assert m[("ecoserve_estimated_systemic_failure_ratio_upper", all_)] == pytest.approx(want.upper, abs=1e-7)
    assert m[("ecoserve_estimated_outcomes", (("ecosystem", "eco"),))] == 2000
    female = np.flatnonzero(sexes_now == "female")
    sub = offline.estimate(now[0][female], now[1][female], now[2][female])
    key = (("ecosystem", "eco"), ("subgroup", "sex"), ("subgroup_value", "female"))
    assert m[("ecoserve_estimated_systemic_failure_ratio", key)] == pytest.approx(sub.value, abs=1e-7)
    acc = offline.accuracy(now[0], now[1])
    assert m[("ecoserve_estimated_accuracy_ratio", (("ecosystem", "eco"), ("member", "b")))] == pytest.approx(
        acc[1].value, abs=1e-7)
    assert m[("ecoserve_estimator_version", (("ecosystem", "eco"),))] == 1
    realized_ref = float((ref[3] == 0).all(axis=1).mean())
    assert m[("ecoserve_estimator_reference_systemic_failure_ratio", (("ecosystem", "eco"),))] == pytest.approx(
        realized_ref)
    # the labels of the estimated outcomes arrive: they leave the estimate, and its error is known
    rec.clock_.t += 10
    truth_now = truth_of(now[0], now[3])
    rec.feedback([LabelItem(f"now{i}", truth_now[i]) for i in range(2000)])
    assert rec.refresh_estimates() == {"eco": 0}
    m = samples(rec)
    realized = float((now[3] == 0).all(axis=1).mean())
    assert m[("ecoserve_estimator_checked_outcomes", (("ecosystem", "eco"),))] == 2000
    assert m[("ecoserve_estimator_error", (("ecosystem", "eco"),))] == pytest.approx(abs(want.value - realized),
                                                                                      abs=1e-7)
    # kept in the store: a restarted recorder starts from the same estimator
    again = Recorder({"eco": SPEC}, open_store(store_url), clock=rec.clock_, window_s=1e9)
    try:
        assert again.estimators["eco"].version == 1
        assert np.allclose(again.estimators["eco"].coef, rec.estimators["eco"].coef)
    finally:
        again.store.close()


def test_scores_round_trip_through_the_store(rec):
    preds = np.array([[1, 2, 3, 4], [5, 5, 5, -1]])
    scores = np.array([[0.9, 0.51, 0.125, 0.3333], [0.7, 0.6, 0.5, np.nan]])
    rec.record(outcomes("s", preds, scores, np.array([0, 1]), T0, ["female", "male"]))
    got = rec.store.get_outcomes(["s0", "s1"])
    assert got["s0"].scores == pytest.approx([0.9, 0.51, 0.125, 0.3333])
    assert got["s1"].scores[:3] == pytest.approx([0.7, 0.6, 0.5]) and got["s1"].scores[3] is None


def test_no_estimate_before_enough_labels(rec):
    rng = np.random.default_rng(3)
    ref = simulate(100, 0.2, rng)
    rec.record(outcomes("x", ref[0], ref[1], ref[2], T0, ["female"] * 100))
    assert rec.refresh_estimates() == {"eco": 0}
    names = {k[0] for k in samples(rec)}
    assert "ecoserve_estimated_systemic_failure_ratio" not in names or not any(
        k[0] == "ecoserve_estimated_systemic_failure_ratio" for k in samples(rec))
