"""Every dashboard panel's query against a real Prometheus scraping the running app.

Starts ecoserve (Ray Serve) and Debian's Prometheus (1 s scrapes, alert rules loaded), drives
traffic and labels in two phases (series first appear in phase 1, so `increase()` sees phase 2
grow), then runs every query of every dashboard through Prometheus's HTTP API: each must return
data, and the systemic-failure panel must equal what this test computes from the members' own
ONNX outputs."""

from __future__ import annotations

import math
import time
import uuid

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import served_app, serving_args
from serving_cases import infer_body

from ecoserve.ops.dashboards import build_dashboards, panel_queries
from ecoserve.ops.prometheus_local import prometheus_binary, start_prometheus
from models.heldout import load_heldout

pytestmark = pytest.mark.slow
TOKEN = "prom-test-token"
CREDIT = ["logreg", "forest", "gboost", "mlp", "knn"]


@pytest.fixture(scope="module")
def stack(serving_repo, tmp_path_factory):
    if prometheus_binary() is None:
        pytest.skip("the prometheus binary is not installed (make test installs Debian's prometheus package)")
    tmp = tmp_path_factory.mktemp("prom")
    args = serving_args(serving_repo)
    args["auth"] = {"feedback_token_env": "ECOSERVE_FEEDBACK_TOKEN"}
    args["telemetry"] = {"store_url": f"sqlite:///{tmp / 'outcomes.db'}", "flush_interval_s": 0.1,
                         "sweep_interval_s": 0.5, "coverage_ages_s": [1, 3600], "estimation": {"interval_s": 0.5}}
    eco = args["ecosystems"]
    eco.pop("broken"), eco.pop("dead")
    eco["faulty"]["faults"] = {"knn": {"error": True}}  # member errors for the serving panels
    eco["credit"]["candidates"] = {"gboost": "2"}  # a candidate version in shadow: the candidate panels
    # a pipeline whose candidate changes one stage (more accurate alone, worse in the chain): the pipeline panels
    eco["digits_chain"] = {"policy": {"kind": "primary", "primary": "chain"}, "candidates": {"chain": "2"}}
    # and one whose candidate helps end to end (better stage, better chain): never flagged
    eco["chain_good"] = {"policy": {"kind": "primary", "primary": "chain"}, "candidates": {"chain": "3"}}
    # a ranking ecosystem with position shuffling: the ranking panels
    eco["shop"] = {"policy": {"kind": "epsilon_greedy", "epsilon": 0.3, "seed": 2}, "position_shuffle_rate": 0.3}
    with served_app(args, tmp, env={"ECOSERVE_FEEDBACK_TOKEN": TOKEN}) as running:
        prom = start_prometheus(running.url.removeprefix("http://"), tmp / "prometheus", scrape_interval_s=1.0)
        try:
            yield running.url, prom, tmp / "outcomes.db"
        finally:
            prom.stop()


def _infer(url, model, x, ids, groups=None):
    params = {"request_ids": ids}
    if groups is not None:
        params["subgroups"] = groups
    r = httpx.post(f"{url}/v2/models/{model}/infer", json=infer_body(x, parameters=params), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_metric(url, name, ecosystem, at_least=0.0, timeout_s=30.0):
    """Wait until /metrics has a sample `name` of `ecosystem` of at least `at_least`."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                if smp.name == name and smp.labels.get("ecosystem") == ecosystem and smp.value >= at_least:
                    return
        time.sleep(0.1)
    raise AssertionError(f"{name} of {ecosystem} did not reach {at_least} within {timeout_s} s")


def _wait_metric_value(url, name, labels, want, timeout_s=30.0):
    """Wait until /metrics has the sample `name{labels}` equal to `want`."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    got = None
    while time.monotonic() < deadline:
        for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
            for smp in fam.samples:
                if smp.name == name and smp.labels == labels:
                    got = smp.value
        if got == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"{name}{labels} = {got}, expected {want}")


def _stored(url, ecosystem, n, timeout_s=30.0):
    """Wait until the recorder has stored `n` outcomes of `ecosystem` (labels for them then join
    at once, so a second, different label is a correction, not a replaced pending label)."""
    _wait_metric(url, "ecoserve_outcomes_total", ecosystem, n, timeout_s)


def _label(url, items):
    r = httpx.post(f"{url}/v2/feedback", json={"labels": items}, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert r.status_code == 200, r.text


def test_every_panel_query_returns_data(stack, serving_repo):
    url, prom, db = stack
    run = uuid.uuid4().hex[:6]
    held = load_heldout(serving_repo / "credit")
    X, y = held.X, held.y
    preds = np.stack([ort.InferenceSession(str(serving_repo / f"credit/{m}/1/model.onnx"),
                                           providers=["CPUExecutionProvider"]).run(["label"], {"input": X})[0]
                      for m in CREDIT], axis=1)
    systemic = (preds != y[:, None]).all(axis=1)
    # phase 1: a systemic failure and a success (subgroup series appear here, then grow in phase 2)
    first = [int(np.flatnonzero(systemic)[0]), int(np.flatnonzero(~systemic)[0])]
    rest = [i for i in range(200) if i not in first]
    groups = [{"sex": str(held.groups["sex"][i]), "age_group": str(held.groups["age_group"][i])} for i in range(len(y))]
    digits = load_heldout(serving_repo / "digits")

    def send(rows, tag):
        for s in range(0, len(rows), 20):
            chunk = rows[s : s + 20]
            _infer(url, "credit", X[chunk], [f"{run}-{tag}-{i}" for i in chunk], [groups[i] for i in chunk])
        _label(url, [{"request_id": f"{run}-{tag}-{i}", "label": int(y[i])} for i in rows])

    send(first, "a")
    _infer(url, "digits", digits.X[:16], [f"{run}-d1-{i}" for i in range(16)])
    _infer(url, "faulty", digits.X[:4], [f"{run}-f1-{i}" for i in range(4)])
    _stored(url, "digits", 16)
    _label(url, [{"request_id": f"{run}-d1-{i}", "label": int(digits.y[i])} for i in range(16)]
           + [{"request_id": f"{run}-d1-0", "label": (int(digits.y[0]) + 1) % 10}])  # a correction
    time.sleep(4)  # several scrapes of phase 1
    send(rest, "b")
    _infer(url, "digits", digits.X[16:80], [f"{run}-d2-{i}" for i in range(64)])
    _infer(url, "faulty", digits.X[4:20], [f"{run}-f2-{i}" for i in range(16)])
    _stored(url, "digits", 80)
    _label(url, [{"request_id": f"{run}-d2-{i}", "label": int(digits.y[16 + i])} for i in range(64)]
           + [{"request_id": f"{run}-d2-0", "label": int(digits.y[16])}]  # duplicate
           + [{"request_id": f"{run}-d2-1", "label": (int(digits.y[17]) + 1) % 10}]  # correction
           + [{"request_id": f"{run}-nope", "label": 1}])  # unknown id
    # phase 3: the label-free estimator fits on the 200 labeled credit outcomes; new credit rows
    # then wait for labels (they are estimated), and half of their labels arrive (its error)
    _wait_metric(url, "ecoserve_estimator_version", "credit", 1)
    later = list(range(200, 260))
    for s in range(0, len(later), 20):
        chunk = later[s : s + 20]
        _infer(url, "credit", X[chunk], [f"{run}-c-{i}" for i in chunk], [groups[i] for i in chunk])
    _wait_metric(url, "ecoserve_estimated_outcomes", "credit", len(later))
    _label(url, [{"request_id": f"{run}-c-{i}", "label": int(y[i])} for i in later[:30]])
    _wait_metric(url, "ecoserve_estimator_checked_outcomes", "credit", 30)
    _risk_in_responses_is_the_estimators(url, db, run, X, groups)
    _self_defeating_pipeline_is_flagged(url, serving_repo, run)
    _ranking_counts_equal_a_hand_count(url, serving_repo, run)
    time.sleep(6)  # scrapes of phases 2 and 3 (and coverage of outcomes older than 1 s)

    subs = {"$window": "2m", "$ecosystem": ".*", "$member": ".*", "$subgroup": ".*"}
    empty = []
    for uid, d in build_dashboards().items():
        for title, expr, _ in panel_queries(d):
            q = expr
            for k, v in subs.items():
                q = q.replace(k, v)
            result = prom.query(q)
            values = [float(r["value"][1]) for r in result]
            if not result or not any(math.isfinite(v) for v in values):
                empty.append((uid, title, q, values))
    assert not empty, "\n".join(f"{u} / {t}: {q} -> {v}" for u, t, q, v in empty)

    # the systemic failure panel equals what the test computes itself over every credit row sent
    # (the counters are exposed, at 0, from the first scrape: increase() covers both phases)
    sfr_expr = panel_queries(build_dashboards()["ecoserve-overview"])[0][1]
    q = sfr_expr.replace("$window", "2m").replace("$ecosystem", "credit")
    got = float(prom.query(q)[0]["value"][1])
    assert got == pytest.approx(systemic[:230].mean(), rel=1e-6)  # the 200 rows and 30 of the later ones
    # the candidate gboost v2 ran in shadow on every credit row: its flips over the 230 labeled rows,
    # counted by hand from ONNX Runtime's own outputs (the deployed counts above ignore it)
    cand = ort.InferenceSession(str(serving_repo / "credit/gboost/2/model.onnx"),
                                providers=["CPUExecutionProvider"]).run(["label"], {"input": X})[0][:230]
    ok_old, ok_new = preds[:230, 2] == y[:230], cand == y[:230]
    others_wrong = (np.delete(preds[:230], 2, axis=1) != y[:230, None]).all(axis=1)
    key = {"ecosystem": "credit", "member": "gboost", "version": "1", "candidate": "2",
           "subgroup": "all", "subgroup_value": "all"}
    for name, want in (("ecoserve_candidate_labeled_total", 230),
                       ("ecoserve_candidate_improvements_total", int((~ok_old & ok_new).sum())),
                       ("ecoserve_candidate_regressions_total", int((ok_old & ~ok_new).sum())),
                       ("ecoserve_candidate_improvements_on_systemic_failures_total",
                        int((~ok_old & ok_new & others_wrong).sum()))):
        _wait_metric_value(url, name, key, want)
    # the alert rules are loaded and evaluated by this Prometheus
    rules = httpx.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {r["name"] for g in rules for r in g["rules"]} >= {"EcoserveSystemicFailureExcess", "EcoserveOutcomesDropped"}


def _ranking_counts_equal_a_hand_count(url, serving_repo, run):
    """The demo's ranking ecosystem through the real Ray app: clicks on the shown lists, counted
    per served member and per slot, equal a count by hand from the responses and the labels."""
    held = load_heldout(serving_repo / "shop")
    x, y = held.X[:400].astype(np.float32), held.y[:400].astype(np.int64)
    shown, served, ids = [], [], []
    for s in range(0, len(y), 200):
        body = _infer(url, "shop", x[s : s + 200], [f"{run}-shop-{i}" for i in range(s, s + 200)])
        out = next(o for o in body["outputs"] if o["name"] == "ranking")
        shown += np.array(out["data"]).reshape(-1, 5).tolist()
        served += body["parameters"]["served_members"]
        ids += body["parameters"]["request_ids"]
    _stored(url, "shop", len(y))
    items = [f"item_{i:02d}" for i in range(60)]
    # 300 clicks on the item each user engaged with, 100 no clicks
    _label(url, [{"request_id": ids[i], "label": items[y[i]] if i < 300 else "no_click"} for i in range(len(y))])
    for member in ("logreg", "mlp", "forest"):
        mine = [i for i in range(len(y)) if served[i] == member]
        clicks = sum(1 for i in mine if i < 300 and y[i] in shown[i])
        key = {"ecosystem": "shop", "member": member}
        _wait_metric_value(url, "ecoserve_ranking_served_labeled_total", key, float(len(mine)))
        _wait_metric_value(url, "ecoserve_ranking_served_clicks_total", key, float(clicks))
    for slot in range(5):
        want = sum(1 for i in range(300) if shown[i][slot] == y[i])
        _wait_metric_value(url, "ecoserve_ranking_slot_clicks_total", {"ecosystem": "shop", "slot": str(slot + 1)},
                           float(want))


def _self_defeating_pipeline_is_flagged(url, serving_repo, run):
    """The demo pipeline through the real Ray app: chain v1 serves, v2 (a better recognize stage)
    runs in shadow; once labeled, the flag is up and the stage's own flips equal a count by hand.
    The same ecosystem with candidate v3 (better stage, better chain): the flag stays 0."""
    held = load_heldout(serving_repo / "digits_chain")
    x, y = held.X.astype(np.float32), held.y.astype(np.int64)

    def own(version):
        sess = ort.InferenceSession(str(serving_repo / f"digits_chain/chain/recognize/{version}/model.onnx"),
                                    providers=["CPUExecutionProvider"])
        return sess.run(["label"], {"input": x})[0].reshape(-1)

    for eco, cand, flagged in (("digits_chain", "2", 1.0), ("chain_good", "3", 0.0)):
        ids = [f"{run}-{eco}-{i}" for i in range(len(y))]
        for s in range(0, len(y), 200):
            _infer(url, eco, x[s : s + 200], ids[s : s + 200])
        _stored(url, eco, len(y))
        _label(url, [{"request_id": i, "label": int(v)} for i, v in zip(ids, y)])
        ok1, ok2 = own("1") == y, own(cand) == y
        stage = {"ecosystem": eco, "member": "chain.recognize", "version": "1", "candidate": cand,
                 "subgroup": "all", "subgroup_value": "all"}
        _wait_metric_value(url, "ecoserve_candidate_improvements_total", stage, int((~ok1 & ok2).sum()))
        _wait_metric_value(url, "ecoserve_candidate_regressions_total", stage, int((ok1 & ~ok2).sum()))
        _wait_metric_value(url, "ecoserve_pipeline_self_defeating_improvement",
                           {"ecosystem": eco, "member": "chain", "version": "1", "candidate": cand,
                            "stage": "recognize"}, flagged)


def _risk_in_responses_is_the_estimators(url, db, run, X, groups):
    """Through the real Ray app: the gateway got the fitted estimator with a hand-over reply, so
    each row's answer carries `systemic_failure_risk`, equal to the estimator (as stored) on the
    same row's stored member outputs and scores."""
    from telemetry.estimation import SystemicEstimator
    from telemetry.store.outcomes import open_store

    rows = list(range(260, 300))
    ids = [f"{run}-r-{i}" for i in rows]
    risks = _infer(url, "credit", X[rows], ids, [groups[i] for i in rows])["parameters"].get("systemic_failure_risks")
    assert risks is not None and len(risks) == len(rows), "the gateway has no estimator yet"
    _stored(url, "credit", 300)
    store = open_store(f"sqlite:///{db}")
    try:
        est = SystemicEstimator.from_json(store.latest_estimators()["credit"])
        got = store.get_outcomes(ids)
    finally:
        store.close()
    stored = [got[i] for i in ids]
    offline = est.risk(np.array([o.predictions for o in stored]),
                       np.array([[np.nan if v is None else v for v in o.scores] for o in stored]),
                       np.array([o.served for o in stored]))
    assert np.allclose(risks, offline, rtol=0, atol=5.001e-5)  # from the scores it recorded; answered to 4 decimals
    assert len(set(np.round(risks, 3))) > 1  # rows differ: a constant would not rank anything
