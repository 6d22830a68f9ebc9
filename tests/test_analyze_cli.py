"""`ecoserve analyze` end to end: the demo ecosystems' own predictions, and bad files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from brute import metrics

from models.heldout import member_predictions, write_predictions_csv

ROOT = Path(__file__).resolve().parent.parent


def ecoserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ecoserve.cli", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def credit_csv(model_repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("csv") / "credit.csv"
    write_predictions_csv(model_repo / "credit", out)
    return out


def test_analyze_json_on_demo_predictions(model_repo, credit_csv):
    proc = ecoserve("analyze", str(credit_csv), "--json", "--group-column", "sex", "--group-column", "age_group")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in (
        "n", "members", "accuracy", "systemic_failure_rate", "consistent_success_rate", "independence_baseline",
        "failures_per_instance", "agreement", "kappa", "unanimity_rate", "ambiguity", "discrepancy", "groups",
    ):
        assert key in out, key
    # recompute from each member's ONNX model run directly, with the plain-Python definitions
    manifest, held, preds = member_predictions(model_repo / "credit")
    names = list(preds)
    assert out["members"] == names
    P = np.stack([preds[n] for n in names], axis=1)
    ref = metrics(P.tolist(), held.y.tolist(), 2)
    assert out["n"] == len(held.y) == ref["n"]
    assert out["systemic_failure_rate"] == pytest.approx(ref["sfr"])
    assert out["independence_baseline"]["systemic_failure_rate"] == pytest.approx(ref["base_sfr"])
    assert out["failures_per_instance"]["observed"] == pytest.approx(ref["observed"])
    for i, n in enumerate(names):
        assert out["accuracy"][n] == pytest.approx(float(np.mean(P[:, i] == held.y)))
    female = held.groups["sex"] == "female"
    ref_f = metrics(P[female].tolist(), held.y[female].tolist(), 2)
    assert out["groups"]["sex"]["female"]["systemic_failure_rate"] == pytest.approx(ref_f["sfr"])
    assert "sex&age_group" in out["groups"]


def test_analyze_table_and_bandit_mode(tmp_path):
    f = tmp_path / "log.csv"
    rows = [["a", "b", "served", "p", "r"]]
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = rng.integers(0, 2, 2)
        s = "a" if rng.random() < 0.7 else "b"
        rows.append([str(a), str(b), s, "0.7" if s == "a" else "0.3", str(int(rng.random() < 0.5))])
    with f.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    args = ["analyze", str(f), "--mode", "bandit", "--served-column", "served", "--propensity-column", "p",
            "--reward-column", "r"]
    proc = ecoserve(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["mode"] == "bandit" and out["exploration"]["min_propensity"] == pytest.approx(0.3)
    table = ecoserve(*args)
    assert "systemic failure rate" in table.stdout and "IPS" in table.stdout


def _bad(tmp_path, text, name="bad.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ("", [], "the file is empty"),
        ("label,a,b\n", [], "no data rows"),
        ("label,a,b\n1,1,0\n0,1\n", [], "line 3 has 2 fields, the header has 3"),
        ("y,a,b\n1,1,0\n", [], "label column 'label' not found"),
        ("label,a\n1,1\n", [], "need at least 2 member columns"),
        ("label,a,b,g\n1,1,0,x\n", ["--group-column", "sex"], "group column 'sex' not found"),
        ("a,b,s,p,r\n1,0,a,high,1\n", ["--mode", "bandit", "--served-column", "s", "--propensity-column", "p",
                                       "--reward-column", "r"], "line 2: column 'p' must be a number, got 'high'"),
        ("a,b,s,p,r\n1,0,a,1.5,1\n", ["--mode", "bandit", "--served-column", "s", "--propensity-column", "p",
                                      "--reward-column", "r"], "must be in (0, 1]"),
        ("a,b,s,p,r\n1,0,zz,0.5,1\n", ["--mode", "bandit", "--served-column", "s", "--propensity-column", "p",
                                       "--reward-column", "r"], "column 's' must name a member, got 'zz'"),
        ("a,b,r\n1,0,1\n", ["--mode", "bandit", "--reward-column", "r"], "bandit mode needs --served-column"),
        ("label,a,b\n1,1,0\n", ["--reference", "c"], "--reference 'c' is not a member column"),
        ("label,a,b\n1,1,0\n", ["--range", "0,10"], "--range and --bin-width are for regression tables"),
        ("label,a,b\n1,1,0\n", ["--tolerance", "1"], "needs --range LOW,HIGH"),
        ("label,a,b\n1.5,high,0\n", ["--tolerance", "1", "--range", "0,10"], "line 2: column 'a' must be a number"),
        ("label,a,b\n1.5,1,0\n", ["--tolerance", "0.001", "--range", "0,10"], "at most 256"),
    ],
)
def test_bad_files_get_one_line_and_nonzero_exit(tmp_path, content, extra, message):
    proc = ecoserve("analyze", str(_bad(tmp_path, content)), *extra)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert message in proc.stderr


def test_analyze_a_regression_table(model_repo, tmp_path):
    """Values, not classes: correct = within the tolerance, agreement by bin, the same rules as
    the live recorder; the diabetes ecosystem's own held-out predictions."""
    out = tmp_path / "diabetes.csv"
    write_predictions_csv(model_repo / "diabetes", out)
    proc = ecoserve("analyze", str(out), "--json", "--tolerance", "40", "--range", "0,400",
                    "--group-column", "sex", "--group-column", "age_group", "--compressed", "mlp_int8")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    manifest, held, preds = member_predictions(model_repo / "diabetes")
    names = list(preds)
    V = np.stack([preds[n] for n in names], axis=1)
    wrong = np.abs(V - held.y[:, None]) > 40
    k = wrong.sum(axis=1)
    assert res["n"] == len(held.y) and res["classes"][0] == "[0,40)" and len(res["classes"]) == 10
    assert res["systemic_failure_rate"] == pytest.approx((k == len(names)).mean())
    assert res["independence_baseline"]["systemic_failure_rate"] == pytest.approx(np.prod(wrong.mean(axis=0)))
    for i, n in enumerate(names):
        assert res["accuracy"][n] == pytest.approx(1 - wrong[:, i].mean())
    bins = np.clip(np.floor(V / 40), 0, 9)
    assert res["unanimity_rate"] == pytest.approx((bins == bins[:, :1]).all(axis=1).mean())
    # an empty cell is a missing output, never a failure
    rows = out.read_text().splitlines()
    cells = rows[1].split(",")
    cells[2] = ""
    rows[1] = ",".join(cells)
    out.write_text("\n".join(rows) + "\n")
    res2 = json.loads(ecoserve("analyze", str(out), "--json", "--tolerance", "40", "--range", "0,400",
                               "--group-column", "sex", "--group-column", "age_group").stdout)
    assert res2["n_complete"] == len(held.y) - 1


def test_a_bad_range_is_a_usage_error(tmp_path):
    proc = ecoserve("analyze", str(_bad(tmp_path, "label,a,b\n1.5,1,0\n")), "--tolerance", "1", "--range", "10")
    assert proc.returncode == 2 and "argument --range: expected LOW,HIGH (two numbers), got '10'" in proc.stderr


def test_missing_file_and_directory(tmp_path):
    proc = ecoserve("analyze", str(tmp_path / "nope.csv"))
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = ecoserve("analyze", str(tmp_path))
    assert proc.returncode == 2 and "is a directory" in proc.stderr


def test_help_lists_every_subcommand():
    import argparse

    from ecoserve.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = set(sub.choices)
    # every subcommand users have: a removed or renamed one fails here
    assert commands >= {"build-models", "predictions", "analyze", "serve", "demo", "dashboards", "alerts", "k8s",
                        "check-config", "migrate-store", "providers"}, commands
    proc = ecoserve("--help")
    for cmd in commands:
        assert f"    {cmd} " in proc.stdout or f"    {cmd}\n" in proc.stdout, (cmd, proc.stdout)
        assert ecoserve(cmd, "--help").returncode == 0, cmd


def test_pure_parts_import_without_ray_or_web_frameworks():
    code = (
        "import sys, telemetry, telemetry.analysis, models, models.heldout; "
        "bad = [m for m in ('ray', 'fastapi', 'starlette', 'serving') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _write(path: Path, preds, scores, labels, members) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*members, *(f"{m}__score" for m in members), "label"])
        for p, s, y in zip(preds, scores, labels):
            w.writerow([*(str(int(v)) for v in p), *(f"{v:.6f}" for v in s), "" if y is None else str(int(y))])


def test_label_free_estimates_from_a_reference_table(tmp_path):
    """`--reference-data LABELED.csv`: the rows without a label are estimated by the estimator fitted
    on the reference (the same numbers as `telemetry.estimation` run on the same rows), and every
    ratio has its Wilson interval."""
    from test_estimation import simulate

    from telemetry.estimation import SystemicEstimator, wilson

    members = ("a", "b", "c", "d")
    rng = np.random.default_rng(20261202)
    preds, scores, served, correct = simulate(3000, 0.15, rng, classes=5)
    scores = np.round(scores, 6)
    truth = [next(int(v) for v, ok in zip(p, c) if ok) if c.any() else
             next(k for k in range(5) if k not in set(p.tolist())) for p, c in zip(preds, correct)]
    ref = tmp_path / "ref.csv"
    _write(ref, preds, scores, truth, members)
    now = simulate(2000, 0.5, rng, classes=5)
    now_scores = np.round(now[1], 6)
    now_truth = [next(int(v) for v, ok in zip(p, c) if ok) if c.any() else
                 next(k for k in range(5) if k not in set(p.tolist())) for p, c in zip(now[0], now[3])]
    labels = [y if i < 500 else None for i, y in enumerate(now_truth)]  # 500 labeled, 1,500 waiting
    table = tmp_path / "now.csv"
    _write(table, now[0], now_scores, labels, members)
    out = subprocess.run([sys.executable, "-m", "ecoserve.cli", "analyze", str(table), "--reference-data", str(ref),
                          "--json"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["members"] == list(members)  # score columns are not members
    # the classes are the union of both tables' values, in the same order (ids "0".."4")
    est = SystemicEstimator.fit(members, preds, scores, np.zeros(3000, dtype=np.int64), correct)
    want = est.estimate(now[0][500:], now_scores[500:], np.zeros(1500, dtype=np.int64))
    got = result["estimated"]
    assert got["n"] == 1500 and got["reference_n"] == 3000
    assert got["systemic_failure_rate"]["value"] == pytest.approx(want.value, abs=1e-9)
    assert got["systemic_failure_rate"]["lower"] == pytest.approx(want.lower, abs=1e-9)
    realized = float((now[3][500:] == 0).all(axis=1).mean())
    assert abs(got["systemic_failure_rate"]["value"] - realized) < abs(got["reference_systemic_failure_rate"] - realized)
    k = round(result["systemic_failure_rate"] * result["n_complete"])
    lo, hi = wilson(k, result["n_complete"])
    assert result["intervals"]["systemic_failure_rate"] == {"lower": pytest.approx(float(lo)), "upper": pytest.approx(float(hi))}
    assert set(result["intervals"]["accuracy"]) == set(members)
    text = subprocess.run([sys.executable, "-m", "ecoserve.cli", "analyze", str(table), "--reference-data", str(ref)],
                          capture_output=True, text=True, check=True).stdout
    assert "estimated for the 1500 rows without a label" in text


def test_reference_data_problems_are_one_line(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("a,b,label\n1,1,1\n0,1,\n")
    ref = tmp_path / "r.csv"
    ref.write_text("a,b,label\n1,1,1\n")  # no score columns
    r = subprocess.run([sys.executable, "-m", "ecoserve.cli", "analyze", str(table), "--reference-data", str(ref)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no column 'a__score'" in r.stderr
    ref.write_text("a,b,a__score,b__score,label\n1,1,0.9,0.8,1\n")
    r = subprocess.run([sys.executable, "-m", "ecoserve.cli", "analyze", str(table), "--reference-data", str(ref)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "too few labeled rows" in r.stderr
    ref.write_text("a,b,a__score,b__score,label\n1,1,1.5,0.8,1\n")
    r = subprocess.run([sys.executable, "-m", "ecoserve.cli", "analyze", str(table), "--reference-data", str(ref)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "must be in [0, 1]" in r.stderr


def test_versions_flip_table_equals_a_count_by_hand(model_repo, tmp_path):
    """`--versions mlp_a=mlp_a,mlp_a_v2`: the demo's digits mlp_a version 1 and its retrained
    version 2, run by ONNX Runtime on the held-out rows; the flip table equals a count by hand."""
    import onnxruntime as ort

    from models.heldout import load_heldout

    held = load_heldout(model_repo / "digits")
    members = ["logreg", "mlp_a", "mlp_b", "forest", "knn"]

    def run(member, version):
        sess = ort.InferenceSession(str(model_repo / f"digits/{member}/{version}/model.onnx"),
                                    providers=["CPUExecutionProvider"])
        return sess.run(["label"], {"input": held.X.astype(np.float32)})[0].reshape(-1)

    cols = {m: run(m, "1") for m in members}
    new = run("mlp_a", "2")
    table = tmp_path / "versions.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*members, "mlp_a_v2", "label"])
        for i in range(len(held.y)):
            w.writerow([*(int(cols[m][i]) for m in members), int(new[i]), int(held.y[i])])
    proc = ecoserve("analyze", str(table), "--versions", "mlp_a=mlp_a,mlp_a_v2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["members"] == members  # the new version is not a member of the ecosystem
    f = out["flips"]["mlp_a"]
    y = held.y
    old_ok, new_ok = cols["mlp_a"] == y, new == y
    others_wrong = np.all([cols[m] != y for m in members if m != "mlp_a"], axis=0)
    imp = ~old_ok & new_ok
    assert f["n"] == len(y)
    assert f["improvements"] == int(imp.sum()) and f["regressions"] == int((old_ok & ~new_ok).sum())
    assert f["improvements_on_systemic_failures"] == int((imp & others_wrong).sum())
    assert f["negative_flip_rate"] == pytest.approx((old_ok & ~new_ok).mean())
    assert f["current_accuracy"] == pytest.approx(old_ok.mean()) and f["candidate_accuracy"] == pytest.approx(new_ok.mean())
    assert f["improvements"] + f["regressions"] > 0  # the two versions differ somewhere
    lo, hi = f["intervals"]["negative_flip_rate"]["lower"], f["intervals"]["negative_flip_rate"]["upper"]
    assert lo <= f["negative_flip_rate"] <= hi
    text = ecoserve("analyze", str(table), "--versions", "mlp_a=mlp_a,mlp_a_v2")
    assert text.returncode == 0 and "version change of mlp_a" in text.stdout and "negative flip rate" in text.stdout


@pytest.mark.parametrize("arg, message", [
    ("mlp_a", "expected MEMBER=OLD_COLUMN,NEW_COLUMN"),
    ("mlp_a=a", "expected MEMBER=OLD_COLUMN,NEW_COLUMN"),
    ("x=a,nope", "--versions x column 'nope' not found"),
    ("x=a,a", "the new version's column 'a' must not be a member column"),
    ("x=label,c", "the current version's column 'label' is not a member column"),
])
def test_bad_versions_arguments(tmp_path, arg, message):
    table = tmp_path / "t.csv"
    table.write_text("a,b,c,label\n1,1,0,1\n0,1,1,0\n")
    r = ecoserve("analyze", str(table), "--versions", arg)
    assert r.returncode == 2 and message in r.stderr, r.stderr
