"""Ranking ecosystems (`task: ranking`): every member's top-k list and the shown list (with
position shuffling and its slot propensities) recorded per outcome; clicks and no-clicks as
labels; systemic misses, click-through, clicks by slot, coverage, exposure Gini, ARP, APLT and
overlap@k equal a hand count from ONNX Runtime's own scores. The real HTTP app, ONNX Runtime
members and a real recorder (SQLite); tests/test_prometheus_e2e.py runs the same through Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from conftest import local_app, serving_args
from test_candidates import value
from test_risk_in_responses import post

from models.heldout import load_heldout
from models.manifest import ManifestError, load_manifest
from serving.config import ConfigError, load_serve_file, preflight
from telemetry.ranking import HEAD_SHARE, gini

ECO = "shop"
MEMBERS = ["logreg", "mlp", "forest"]
K = 5


def top_lists(repo: Path, x: np.ndarray) -> np.ndarray:
    """(n, M, k): each member's k best items, from ONNX Runtime's scores (ties to the lower id)."""
    out = []
    for m in MEMBERS:
        sess = ort.InferenceSession(str(repo / ECO / m / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        scores = sess.run(["probabilities"], {"input": x})[0].astype(np.float64)
        out.append(np.argsort(-scores, axis=1, kind="stable")[:, :K])
    return np.stack(out, axis=1)


def build(repo: Path, db: Path, **eco: Any) -> tuple[Any, Any]:
    args = serving_args(repo)
    args["ecosystems"] = {ECO: {"policy": {"kind": "epsilon_greedy", "epsilon": 0.3, "seed": 1}, **eco}}
    args["telemetry"] = {"store_url": f"sqlite:///{db}"}
    args["limits"] = {"max_rows_per_request": 2000, "max_body_bytes": 4_000_000}
    return local_app(args)


def test_lists_clicks_and_catalogue_metrics_equal_a_hand_count(serving_repo: Path, tmp_path: Path) -> None:
    held = load_heldout(serving_repo / ECO)
    x, y = held.X.astype(np.float32), held.y.astype(np.int64)
    n = len(y)
    app, host = build(serving_repo, tmp_path / "o.db", position_shuffle_rate=0.25)
    try:
        r = post(app, f"/v2/models/{ECO}/infer", {"id": "s", "inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
        assert r.status_code == 200, r.text
        body = r.json()
        out = {o["name"]: o for o in body["outputs"]}
        assert set(out) == {"ranking", "scores"} and out["ranking"]["shape"] == [n, K]
        shown = np.array(out["ranking"]["data"]).reshape(n, K)
        params = body["parameters"]
        ids, served = params["request_ids"], [MEMBERS.index(s) for s in params["served_members"]]
        props = np.array(params["slot_propensities"])
        lists = top_lists(serving_repo, x)
        items = load_manifest(serving_repo / ECO).classes
        assert params["ranked_items"][0] == [items[i] for i in shown[0]]
        # the shown list is the served member's list, in its order or shuffled (then each slot 0.25/5 + ...)
        in_order = (shown == lists[np.arange(n), served]).all(axis=1)
        for i in range(n):
            assert sorted(shown[i]) == sorted(lists[i, served[i]])
            want = 0.75 * (shown[i] == lists[i, served[i]]) + 0.25 / K
            assert np.allclose(props[i], want, atol=1e-6)
        assert 0.6 < in_order.mean() < 0.9  # about 75% + the shuffles that keep the order
        stored = host.store.get_outcomes(ids[:3])
        for i in range(3):
            o = stored[ids[i]]
            assert o.rankings == [lists[i, a].tolist() for a in range(3)]
            assert o.shown[0] == shown[i].tolist()
        # labels: the first 60% click the item they engaged with, the next 20% click nothing
        click_n, none_n = int(n * 0.6), int(n * 0.2)
        labels = [{"request_id": ids[i], "label": items[int(y[i])]} for i in range(click_n)]
        labels += [{"request_id": ids[i], "label": "no_click"} for i in range(click_n, click_n + none_n)]
        got = post(app, "/v2/feedback", {"labels": labels})
        assert got.status_code == 200, got.text
        lab = np.full(n, -1)
        lab[:click_n] = y[:click_n]
        labeled = np.arange(n) < click_n + none_n
        clicked_shown = np.array([lab[i] >= 0 and lab[i] in shown[i] for i in range(n)])
        # systemic miss: the clicked item in no member's list
        hit = np.array([[lab[i] in lists[i, a] for a in range(3)] for i in range(n)])
        miss = (lab >= 0) & ~hit.any(axis=1)
        assert value(host, "ecoserve_systemic_failures_total", ecosystem=ECO, source="observed", subgroup="all",
                     subgroup_value="all") == int(miss.sum())
        # the ecosystem counters (hit@k, systemic miss) count clicks; no-clicks count in click-through
        assert value(host, "ecoserve_labeled_outcomes_total", ecosystem=ECO, source="observed", subgroup="all",
                     subgroup_value="all") == click_n
        for a, m in enumerate(MEMBERS):
            mine = labeled & (np.array(served) == a)
            assert value(host, "ecoserve_ranking_served_labeled_total", ecosystem=ECO, member=m) == int(mine.sum())
            assert value(host, "ecoserve_ranking_served_clicks_total", ecosystem=ECO, member=m) == \
                int((mine & clicked_shown).sum())
            assert value(host, "ecoserve_ranking_ctr_ratio", ecosystem=ECO, member=m) == \
                pytest.approx((mine & clicked_shown).sum() / mine.sum())
            # hit@k: the member's accuracy on clicks
            assert value(host, "ecoserve_member_correct_total", ecosystem=ECO, member=m, source="observed",
                         subgroup="all", subgroup_value="all") == int(hit[lab >= 0, a].sum())
        for slot in range(K):
            want = sum(1 for i in range(n) if lab[i] >= 0 and shown[i, slot] == lab[i])
            assert value(host, "ecoserve_ranking_slot_clicks_total", ecosystem=ECO, slot=str(slot + 1)) == want
            assert value(host, "ecoserve_ranking_slot_labeled_total", ecosystem=ECO, slot=str(slot + 1)) == \
                click_n + none_n
        # catalogue metrics of each list and of what was shown
        clicks = np.bincount(lab[lab >= 0], minlength=len(items))
        pop = clicks / clicks.sum()
        order = np.argsort(-clicks, kind="stable")
        n_head = int(np.searchsorted(np.cumsum(clicks[order]) / clicks.sum(), HEAD_SHARE) + 1)
        head = np.zeros(len(items), dtype=bool)
        head[order[:n_head]] = True
        for name, arr in [*((m, lists[:, a]) for a, m in enumerate(MEMBERS)), ("shown", shown)]:
            exposure = np.bincount(arr.reshape(-1), minlength=len(items))
            assert value(host, "ecoserve_ranking_coverage_ratio", ecosystem=ECO, list=name) == \
                pytest.approx((exposure > 0).mean())
            assert value(host, "ecoserve_ranking_exposure_gini", ecosystem=ECO, list=name) == \
                pytest.approx(gini(exposure))
            assert value(host, "ecoserve_ranking_average_popularity_ratio", ecosystem=ECO, list=name) == \
                pytest.approx(pop[arr].mean())
            assert value(host, "ecoserve_ranking_long_tail_ratio", ecosystem=ECO, list=name) == \
                pytest.approx((~head[arr]).mean())
        overlap = np.mean([len(set(lists[i, 0]) & set(lists[i, 1])) / K for i in range(n)])
        assert value(host, "ecoserve_ranking_overlap_ratio", ecosystem=ECO, member="logreg", other="mlp") == \
            pytest.approx(overlap)
        # position bias from the shuffled rows, and each member's off-policy click-through
        rows = host.store.get_outcomes(ids)
        shuffled = np.array([rows[rid].shown[3] == 1 for rid in ids])
        ranks = np.array([rows[rid].shown[2] for rid in ids])
        assert shuffled.sum() > 50
        sl = labeled & shuffled
        ctr = np.array([sum(1 for i in np.flatnonzero(sl) if lab[i] >= 0 and shown[i, j] == lab[i]) / sl.sum()
                        for j in range(K)])
        theta = np.maximum(ctr / ctr[0], 1e-3)
        for j in range(K):
            assert value(host, "ecoserve_ranking_examination_ratio", ecosystem=ECO, slot=str(j + 1)) == \
                pytest.approx(theta[j])
        w = 1.0 / np.array(params["propensities"])
        reward = np.zeros(n)
        for i in range(n):
            if clicked_shown[i]:
                j = int(np.flatnonzero(shown[i] == lab[i])[0])
                reward[i] = theta[ranks[i, j]] / theta[j]
        for a, m in enumerate(MEMBERS):
            mine = labeled & (np.array(served) == a)
            snips = (w[mine] * reward[mine]).sum() / w[mine].sum()
            assert value(host, "ecoserve_ranking_snips_ctr_ratio", ecosystem=ECO, member=m) == pytest.approx(snips)
            assert value(host, "ecoserve_ranking_ips_ctr_ratio", ecosystem=ECO, member=m) == \
                pytest.approx((w[mine] * reward[mine]).sum() / labeled.sum())
            lo = value(host, "ecoserve_ranking_snips_ctr_ratio_lower", ecosystem=ECO, member=m)
            hi = value(host, "ecoserve_ranking_snips_ctr_ratio_upper", ecosystem=ECO, member=m)
            assert lo is not None and hi is not None and lo < snips < hi
        before = host.metrics()
    finally:
        host.close()
    # a restarted recorder rebuilds every ranking count from the store
    _, again = build(serving_repo, tmp_path / "o.db", position_shuffle_rate=0.25)
    try:
        keep = [ln for ln in before.decode().splitlines() if ln.startswith("ecoserve_ranking_")]
        now = again.metrics().decode().splitlines()
        assert keep and all(ln in now for ln in keep)
    finally:
        again.close()


def test_gini_of_exposure() -> None:
    assert gini(np.array([5, 5, 5, 5])) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 8])) == pytest.approx(0.75)
    assert gini(np.array([0, 0])) is None


def test_bad_ranking_labels_and_configs_are_refused(serving_repo: Path, tmp_path: Path) -> None:
    app, host = build(serving_repo, tmp_path / "o.db")
    try:
        x = load_heldout(serving_repo / ECO).X[:1].astype(np.float32)
        r = post(app, f"/v2/models/{ECO}/infer", {"id": "b", "inputs": [
            {"name": "input", "shape": [1, 8], "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
        rid = r.json()["parameters"]["request_ids"][0]
        got = post(app, "/v2/feedback", {"labels": [{"request_id": rid, "label": "item_99"}]})
        assert got.status_code == 422 and "item_99" in got.text
        got = post(app, "/v2/feedback", {"labels": [{"request_id": rid, "label": 60}]})  # the no-click id: fine
        assert got.status_code == 200, got.text
        # a ranking ecosystem's outcomes come from its inference endpoint (every member's list), not from outside
        got = post(app, "/v2/outcomes", {"outcomes": [{"request_id": "o1", "ecosystem": ECO,
                                                       "outputs": {"logreg": "item_01"}}]})
        assert got.status_code == 422 and "is a ranking ecosystem" in got.text, got.text
    finally:
        host.close()
    from conftest import write_serve_file

    args = serving_args(serving_repo)
    args["ecosystems"] = {"digits": {"policy": {"kind": "primary", "primary": "mlp_a"}, "position_shuffle_rate": 0.1}}
    with pytest.raises(ConfigError, match="position_shuffle_rate: for ranking ecosystems only"):
        preflight(load_serve_file(write_serve_file(tmp_path / "s.yaml", 8000, args)), check_port=False)


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.pop("ranking"), "task ranking needs 'ranking' settings"),
    (lambda m: m["ranking"].update(k=61), "fewer than k = 61"),
    (lambda m: m["ranking"].update(no_click="item_03"), "is also an item"),
    (lambda m: m.update(probability_output=None), "needs probability_output"),
])
def test_bad_ranking_manifests_are_refused(serving_repo: Path, tmp_path: Path, change: Any, message: str) -> None:
    raw = yaml.safe_load((serving_repo / ECO / "ecosystem.yaml").read_text())
    change(raw)
    (tmp_path / ECO).mkdir()
    (tmp_path / ECO / "ecosystem.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ManifestError, match=message):
        load_manifest(tmp_path / ECO)


def test_request_candidates_limit_every_members_list(serving_repo: Path, tmp_path: Path) -> None:
    held = load_heldout(serving_repo / ECO)
    x = held.X[:6].astype(np.float32)
    items = load_manifest(serving_repo / ECO).classes
    pool = [items[i] for i in (3, 7, 11, 20, 33, 41, 50, 59)]
    app, host = build(serving_repo, tmp_path / "o.db")

    def infer(candidates: Any) -> Any:
        return post(app, f"/v2/models/{ECO}/infer", {"id": "c", "parameters": {"candidates": candidates}, "inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]})

    try:
        r = infer(pool)
        assert r.status_code == 200, r.text
        ids = r.json()["parameters"]["request_ids"]
        allowed = np.zeros(len(items), dtype=bool)
        allowed[[items.index(p) for p in pool]] = True
        for a, m in enumerate(MEMBERS):
            sess = ort.InferenceSession(str(serving_repo / ECO / m / "1" / "model.onnx"),
                                        providers=["CPUExecutionProvider"])
            scores = np.where(allowed, sess.run(["probabilities"], {"input": x})[0].astype(np.float64), -np.inf)
            want = np.argsort(-scores, axis=1, kind="stable")[:, :K]
            stored = host.store.get_outcomes(ids)
            assert [stored[i].rankings[a] for i in ids] == want.tolist()
            assert [stored[i].predictions[a] for i in ids] == want[:, 0].tolist()  # its first listed item
        shown = np.array(r.json()["outputs"][0]["data"]).reshape(-1, K)
        assert allowed[shown].all()
        # one list per row; indices work as well as names
        per_row = [[i, i + 1, i + 2, i + 3, i + 4] for i in range(6)]
        r = infer(per_row)
        assert r.status_code == 200, r.text
        shown = np.array(r.json()["outputs"][0]["data"]).reshape(-1, K)
        assert all(sorted(shown[i]) == per_row[i] for i in range(6))
        for bad, message in (
            (["item_03", "nope"], "'nope' is not an item"),
            ([3, 7, 11, 99, 20], "99 is not an item"),
            (pool[:4], "4 distinct items, fewer than the list length k = 5"),
            ([pool] * 5, "5 lists for 6 rows"),
            ([True, 1, 2, 3, 4], "got bool"),
            ("item_03", "must be a non-empty list"),
            ([], "must be a non-empty list"),
        ):
            r = infer(bad)
            assert r.status_code == 400 and message in r.text, (bad, r.text)
    finally:
        host.close()
    # candidates on a classification ecosystem: refused
    app2, host2 = local_app({**serving_args(serving_repo), "ecosystems": {
        "digits": {"policy": {"kind": "primary", "primary": "mlp_a"}}},
        "telemetry": {"store_url": f"sqlite:///{tmp_path / 'd.db'}"}})
    try:
        xd = load_heldout(serving_repo / "digits").X[:1].astype(np.float32)
        r = post(app2, "/v2/models/digits/infer", {"id": "d", "parameters": {"candidates": ["1"]}, "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": xd.reshape(-1).tolist()}]})
        assert r.status_code == 400 and "candidates are for ranking" in r.text
    finally:
        host2.close()
