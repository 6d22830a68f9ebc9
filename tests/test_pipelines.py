"""Pipeline members (a chain of ONNX stages, `kind: pipeline`) and their stage candidates: each
stage's output recorded with the outcome, the chain's and the changed stage's flips counted as
labels arrive (equal to a count by hand from ONNX Runtime's own outputs), and the
self-defeating-improvement flag: raised for the demo's chain v2 (a recognize stage that is better
on its own, a chain that gets worse), not for v3 (better in both). The real HTTP app, ONNX Runtime
members and a real recorder (SQLite); no Ray (tests/test_prometheus_e2e.py runs the pipeline
through the real Ray app)."""

from __future__ import annotations

import hashlib
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
from telemetry.flips import delta_interval
from telemetry.version_change import VersionChangeCounts

ECO = "digits_chain"
MEMBERS = ["chain", "forest", "knn"]


def run(repo: Path, rel: str, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(repo / ECO / rel), providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in sess.run(outputs, {"input": x})]


def chain_by_hand(repo: Path, version: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chain's class, recognize's own class, recognize's probabilities) straight from ONNX Runtime."""
    own, probs = run(repo, f"chain/recognize/{version}/model.onnx", x, ["label", "probabilities"])
    label, = run(repo, "chain/decide/1/model.onnx", probs.astype(np.float32), ["label"])
    return label.reshape(-1).astype(np.int64), own.reshape(-1).astype(np.int64), probs


def build(repo: Path, db: Path, eco_cfg: dict[str, Any]) -> tuple[Any, Any]:
    args = serving_args(repo)
    args["ecosystems"] = {ECO: {"policy": {"kind": "primary", "primary": "chain"}, **eco_cfg}}
    args["telemetry"] = {"store_url": f"sqlite:///{db}"}
    args["limits"] = {"max_rows_per_request": 1000}
    return local_app(args)


def infer(app: Any, x: np.ndarray, rid: str) -> dict[str, Any]:
    r = post(app, f"/v2/models/{ECO}/infer", {"id": rid, "inputs": [
        {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_self_defeating_improvement_is_flagged(serving_repo: Path, tmp_path: Path) -> None:
    held = load_heldout(serving_repo / ECO)
    x, y = held.X.astype(np.float32), held.y.astype(np.int64)
    app, host = build(serving_repo, tmp_path / "o.db", {"candidates": {"chain": "2"}})
    try:
        body = infer(app, x, "r")
        ids = body["parameters"]["request_ids"]
        chain1, own1, probs1 = chain_by_hand(serving_repo, "1", x)
        chain2, own2, _ = chain_by_hand(serving_repo, "2", x)
        # the chain serves (version 1): its answer is recognize v1 then decide, run by hand
        assert (np.array(body["outputs"][0]["data"]) == chain1).all()
        # every stage's output recorded: its own class and score, and a fingerprint of what it passed on
        stored = host.store.get_outcomes(ids)
        for i in (0, 1, len(ids) - 1):
            o = stored[ids[i]]
            got = {(role, stage): (v, fp, cls, score) for a, role, stage, v, fp, cls, score in o.stages}
            assert {a for a, *_ in o.stages} == {0}
            assert set(got) == {(0, "recognize"), (0, "decide"), (1, "recognize"), (1, "decide")}
            v, fp, cls, score = got[(0, "recognize")]
            assert (v, cls) == ("1", int(own1[i]))
            assert fp == hashlib.blake2b(probs1[i].astype(np.float32).tobytes(), digest_size=6).hexdigest()
            assert score == pytest.approx(float(probs1[i, own1[i]]), rel=1e-3)
            assert (got[(1, "recognize")][0], got[(1, "recognize")][2]) == ("2", int(own2[i]))
            assert (got[(0, "decide")][0], got[(0, "decide")][2]) == ("1", int(chain1[i]))
            assert o.candidates == [[0, "1", "2", int(chain2[i]), o.candidates[0][4]]]
        # labels arrive: the chain's flips and the recognize stage's, by hand
        r = post(app, "/v2/feedback", {"labels": [{"request_id": i, "label": int(v)} for i, v in zip(ids, y)]})
        assert r.status_code == 200, r.text
        others = np.stack([run(serving_repo, f"{m}/1/model.onnx", x, ["label"])[0].reshape(-1) == y
                           for m in MEMBERS[1:]], axis=1).astype(int)
        for member, cur, cand in (("chain", chain1, chain2), ("chain.recognize", own1, own2)):
            hand = VersionChangeCounts.from_arrays((cur == y).astype(int), (cand == y).astype(int), others)
            labels = {"ecosystem": ECO, "member": member, "version": "1", "candidate": "2",
                      "subgroup": "all", "subgroup_value": "all"}
            assert value(host, "ecoserve_candidate_labeled_total", **labels) == hand.n == len(y)
            assert value(host, "ecoserve_candidate_improvements_total", **labels) == hand.improvements
            assert value(host, "ecoserve_candidate_regressions_total", **labels) == hand.regressions
            assert value(host, "ecoserve_candidate_improvements_on_systemic_failures_total", **labels) == \
                hand.improvements_on_systemic
            d = delta_interval(hand.improvements, hand.regressions, hand.n)
            assert d is not None
            assert value(host, "ecoserve_candidate_accuracy_delta_lower", **labels) == pytest.approx(d[1])
            assert value(host, "ecoserve_candidate_accuracy_delta_upper", **labels) == pytest.approx(d[2])
        # recognize v2 is better on its own, the chain worse: both intervals exclude 0, and the flag is up
        assert value(host, "ecoserve_candidate_accuracy_delta_lower", ecosystem=ECO, member="chain.recognize",
                     version="1", candidate="2", subgroup="all", subgroup_value="all") > 0
        assert value(host, "ecoserve_candidate_accuracy_delta_upper", ecosystem=ECO, member="chain", version="1",
                     candidate="2", subgroup="all", subgroup_value="all") < 0
        flag = {"ecosystem": ECO, "member": "chain", "version": "1", "candidate": "2", "stage": "recognize"}
        assert value(host, "ecoserve_pipeline_self_defeating_improvement", **flag) == 1
        # label-free, at record time: how often the stage's own class agreed
        assert value(host, "ecoserve_candidate_agreements_total", ecosystem=ECO, member="chain.recognize",
                     version="1", candidate="2") == int((own1 == own2).sum())
    finally:
        host.close()
    # a restarted recorder rebuilds the stage flips and the flag from the store
    _, again = build(serving_repo, tmp_path / "o.db", {"candidates": {"chain": "2"}})
    try:
        assert value(again, "ecoserve_pipeline_self_defeating_improvement", **flag) == 1
    finally:
        again.close()


def test_a_stage_that_helps_end_to_end_is_not_flagged(serving_repo: Path, tmp_path: Path) -> None:
    held = load_heldout(serving_repo / ECO)
    x, y = held.X.astype(np.float32), held.y.astype(np.int64)
    app, host = build(serving_repo, tmp_path / "o.db", {"candidates": {"chain": "3"}})
    try:
        ids = infer(app, x, "h")["parameters"]["request_ids"]
        r = post(app, "/v2/feedback", {"labels": [{"request_id": i, "label": int(v)} for i, v in zip(ids, y)]})
        assert r.status_code == 200, r.text
        chain1, own1, _ = chain_by_hand(serving_repo, "1", x)
        chain3, own3, _ = chain_by_hand(serving_repo, "3", x)
        assert (chain3 == y).mean() > (chain1 == y).mean() and (own3 == y).mean() > (own1 == y).mean()
        flag = {"ecosystem": ECO, "member": "chain", "version": "1", "candidate": "3", "stage": "recognize"}
        assert value(host, "ecoserve_pipeline_self_defeating_improvement", **flag) == 0
        assert value(host, "ecoserve_candidate_accuracy_delta", ecosystem=ECO, member="chain", version="1",
                     candidate="3", subgroup="all", subgroup_value="all") == \
            pytest.approx((chain3 == y).mean() - (chain1 == y).mean())
    finally:
        host.close()


def test_no_candidate_still_records_the_stages(serving_repo: Path, tmp_path: Path) -> None:
    held = load_heldout(serving_repo / ECO)
    x = held.X[:5].astype(np.float32)
    app, host = build(serving_repo, tmp_path / "o.db", {})
    try:
        ids = infer(app, x, "n")["parameters"]["request_ids"]
        o = host.store.get_outcomes(ids)[ids[0]]
        assert [(role, stage, v) for _a, role, stage, v, *_ in o.stages] == [(0, "recognize", "1"), (0, "decide", "1")]
        assert o.candidates is None
        assert value(host, "ecoserve_pipeline_self_defeating_improvement", ecosystem=ECO, member="chain",
                     version="1", candidate="2", stage="recognize") is None
    finally:
        host.close()


def _manifest(repo: Path, tmp_path: Path, change: Any) -> Path:
    """A copy of the digits_chain manifest with `change` applied to its chain v1 entry."""
    raw = yaml.safe_load((repo / ECO / "ecosystem.yaml").read_text())
    chain = next(m for m in raw["members"] if m["name"] == "chain" and m["version"] == "1")
    change(chain)
    d = tmp_path / ECO
    d.mkdir(exist_ok=True)
    (d / "ecosystem.yaml").write_text(yaml.safe_dump(raw))
    return d


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(stages=m["stages"][:1]), "at least 2 stages"),
    (lambda m: m["stages"][0].pop("output"), "stage 'recognize' needs an output"),
    (lambda m: m["stages"][1].update(output="label"), "the last stage 'decide' has no output to pass on"),
    (lambda m: m["stages"][1].update(name="recognize"), "stage names must be distinct"),
    (lambda m: m["stages"][0].pop("label_output"), "probability_output needs label_output"),
    (lambda m: m.update(path="chain/1/model.onnx"), "no path or remote"),
    (lambda m: m["stages"][0].update(path="../x/model.onnx"), "relative path ending in model.onnx"),
    (lambda m: m.update(kind="onnx", path="x/1/model.onnx"), "stages are for kind pipeline only"),
])
def test_bad_pipeline_manifests_are_refused(tmp_path: Path, model_repo: Path, change: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        load_manifest(_manifest(model_repo, tmp_path, change))


def test_config_check_names_a_missing_stage_file(serving_repo: Path, tmp_path: Path) -> None:
    import shutil

    from conftest import write_serve_file

    repo = tmp_path / "repo"
    shutil.copytree(serving_repo / ECO, repo / ECO)
    args = serving_args(repo)
    args["ecosystems"] = {ECO: {"policy": {"kind": "primary", "primary": "chain"}, "candidates": {"chain": "2"}}}
    f = write_serve_file(tmp_path / "serve.yaml", 8000, args)
    preflight(load_serve_file(f), check_port=False)  # whole: fine
    (repo / ECO / "chain/recognize/2/model.onnx").unlink()
    with pytest.raises(ConfigError, match=r"candidates\.chain: no model file .*chain/recognize/2/model.onnx"):
        preflight(load_serve_file(f), check_port=False)
    (repo / ECO / "chain/decide/1/model.onnx").unlink()
    args["ecosystems"][ECO].pop("candidates")
    f = write_serve_file(tmp_path / "serve.yaml", 8000, args)
    with pytest.raises(ConfigError, match=r"member 'chain': no model file .*chain/decide/1/model.onnx"):
        preflight(load_serve_file(f), check_port=False)


def test_batched_calls_split_the_stage_records_back(serving_repo: Path) -> None:
    """Dynamic batching joins callers' rows into one run and splits the result back: a pipeline's
    stage records travel with their rows (`split_prediction`, used by both batching layers)."""
    from models.runtime import load_member
    from serving.members import split_prediction, stage_info

    d = serving_repo / ECO
    manifest = load_manifest(d)
    session = load_member(d, manifest, manifest.member("chain", "2"), "cpu")
    x = load_heldout(d).X[:10].astype(np.float32)
    joined = session.predict(x)
    parts = split_prediction(joined, [3, 7])
    for part, rows in zip(parts, (slice(0, 3), slice(3, 10))):
        alone = session.predict(x[rows])
        assert (part[0] == alone[0]).all() and np.allclose(part[1], alone[1])
        info, want = stage_info(part), stage_info(alone)
        assert info is not None and want is not None and info.shape == (len(alone[0]), 2, 3)
        assert np.array_equal(info, want, equal_nan=True)


def test_a_stage_label_needs_a_classification_ecosystem(tmp_path: Path, model_repo: Path) -> None:
    raw = yaml.safe_load((model_repo / "diabetes" / "ecosystem.yaml").read_text())
    raw["members"].append({"name": "chain", "version": "1", "kind": "pipeline", "stages": [
        {"name": "a", "version": "1", "path": "a/1/model.onnx", "output": "variable", "label_output": "variable"},
        {"name": "b", "version": "1", "path": "b/1/model.onnx"}]})
    (tmp_path / "diabetes").mkdir()
    (tmp_path / "diabetes" / "ecosystem.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ManifestError, match="a stage's label_output is for classification ecosystems"):
        load_manifest(tmp_path / "diabetes")
