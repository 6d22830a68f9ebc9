"""`POST /v2/outcomes` through the real HTTP app with a real recorder (SQLite and the PostgreSQL
server): an ecosystem whose
members are all external takes a prediction log and its labels, and streams the same counts as
`ecoserve analyze` computes offline on the same table; a replayed batch changes nothing; every
kind of bad record gets a 422 naming it, with nothing half-applied."""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import fresh_store
from serving_cases import infer_body
from test_recorder import value

from models.heldout import write_predictions_csv
from models.runtime import load_member
from serving.config import parse_serving
from serving.dataplane import Dataplane
from serving.http import build_http_app
from serving.members import LocalMember
from serving.recording.host import LocalTelemetry, RecorderHost, recorder_specs
from telemetry.analysis import AnalysisOptions, analyze_csv

MEMBERS = ["logreg", "forest", "gboost", "mlp", "knn"]


def _external(src: Path, dst: Path, name: str, keep: list[str], external: list[str]) -> None:
    """A copy of ecosystem `src` named `name`: members in `keep` as they are, `external` as
    `kind: external` members (no file)."""
    shutil.copytree(src, dst / name)
    m = yaml.safe_load((dst / name / "ecosystem.yaml").read_text())
    m["name"] = name
    m["members"] = [x for x in m["members"] if x["name"] in keep] + [
        {"name": e, "version": "1", "kind": "external"} for e in external]
    (dst / name / "ecosystem.yaml").write_text(yaml.safe_dump(m, sort_keys=False))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(request, serving_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("outside")
    with fresh_store(request.param, root) as store_url:
        yield from _env(serving_repo, root, store_url)


def _env(serving_repo, root, store_url):
    repo = root / "repo"
    repo.mkdir()
    _external(serving_repo / "credit", repo, "credit_log", [], MEMBERS)  # every member external
    _external(serving_repo / "digits", repo, "mixed", ["mlp_a", "logreg"], ["vendor"])
    cfg = parse_serving({
        "model_repository": str(repo), "provider": "cpu",
        "telemetry": {"store_url": store_url},
        "ecosystems": {"credit_log": {}, "mixed": {"policy": {"kind": "primary", "primary": "mlp_a"}}},
    })
    host = RecorderHost(recorder_specs(cfg), cfg.telemetry.model_dump(mode="json"))
    dataplane = Dataplane.build(cfg, lambda d, m, s: LocalMember(load_member(d, m, s, "cpu")),
                                sink=lambda o: host.record(o, "t", {}))
    csv_path = root / "credit.csv"
    write_predictions_csv(serving_repo / "credit", csv_path)
    yield build_http_app(dataplane, LocalTelemetry(host)), host, csv_path
    host.close()


def post(app, path, body) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(path, content=json.dumps(body).encode(), timeout=60)

    return asyncio.run(go())


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open() as f:
        return list(csv.DictReader(f))


def test_an_all_external_ecosystem_takes_outcomes_only(env):
    app, _, _ = env
    r = post(app, "/v2/models/credit_log/infer", infer_body(__import__("numpy").zeros((1, 27))))
    assert r.status_code == 404 and "takes outcomes only" in r.json()["error"]


def test_a_log_and_its_labels_stream_what_analyze_computes_offline(env):
    app, host, csv_path = env
    rows = _rows(csv_path)
    records = [{"request_id": f"log-{i}", "ecosystem": "credit_log",
                "outputs": {m: row[m] for m in MEMBERS},
                "subgroups": {"sex": row["sex"], "age_group": row["age_group"]}} for i, row in enumerate(rows)]
    r = post(app, "/v2/outcomes", {"outcomes": records})
    assert r.status_code == 200, r.text
    assert r.json()["recorded"] == len(rows)
    r = post(app, "/v2/feedback", {"labels": [{"request_id": f"log-{i}", "label": row["label"]}
                                              for i, row in enumerate(rows)]})
    assert r.status_code == 200 and r.json()["counts"] == {"joined": len(rows)}, r.text
    offline = analyze_csv(csv_path, AnalysisOptions(group_columns=("sex", "age_group"), members=tuple(MEMBERS)))
    rec = host.recorder
    labels = rec.snapshot().ecosystems["credit_log"].labels["observed"]
    n = len(rows)
    assert labels.n_complete == offline["n"] == n
    assert labels.k_hist[-1] / n == pytest.approx(offline["systemic_failure_rate"])
    assert labels.k_hist[0] / n == pytest.approx(offline["consistent_success_rate"])
    for a, m in enumerate(MEMBERS):
        assert labels.member_correct[a] / labels.member_n[a] == pytest.approx(offline["accuracy"][m])
    preds = rec.snapshot().ecosystems["credit_log"].predictions
    for a in range(5):
        for b in range(a + 1, 5):
            assert preds.agree[a, b] / preds.n_predicted == pytest.approx(offline["agreement"][MEMBERS[a]][MEMBERS[b]])
    female = offline["groups"]["sex"]["female"]
    assert value(rec, "ecoserve_systemic_failures_total", ecosystem="credit_log", source="observed",
                 subgroup="sex", subgroup_value="female") == pytest.approx(female["systemic_failure_rate"] * female["n"])
    # the origin is marked in the store
    with host.store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT DISTINCT policy FROM ecoserve_outcomes_v WHERE ecosystem = 'credit_log'"
                                    ).fetchall() == [("external",)]
    # a replayed batch changes no counter
    before = rec.snapshot().ecosystems["credit_log"].outcomes
    r = post(app, "/v2/outcomes", {"outcomes": records})
    assert r.status_code == 200 and r.json()["unchanged"] == len(rows) and r.json()["recorded"] == 0
    assert rec.snapshot().ecosystems["credit_log"].outcomes == before


def test_ten_thousand_records_in_one_request(env):
    app, host, _ = env
    records = [{"request_id": f"bulk-{i}", "ecosystem": "credit_log", "outputs": {"logreg": i % 2, "knn": 1},
                "served": "logreg", "propensity": 0.5} for i in range(10_000)]
    r = post(app, "/v2/outcomes", {"outcomes": records})
    assert r.status_code == 200 and r.json()["recorded"] == 10_000, r.text[:300]
    got = host.store.get_outcomes(["bulk-7"])["bulk-7"]
    assert got.predictions == [1, -1, -1, -1, 1] and got.served == 0  # unnamed members are missing


BAD = [
    ("unknown ecosystem", {"ecosystem": "nope"}, "item 1: ecosystem: 'nope' is not served here"),
    ("unknown member", {"outputs": {"zz": "good"}}, "item 1: outputs.zz: not a member of 'credit_log'"),
    ("class not in the ecosystem", {"outputs": {"knn": "maybe"}}, "item 1: outputs.knn: 'maybe' is not a class"),
    ("class id out of range", {"outputs": {"knn": 7}}, "item 1: outputs.knn: class id 7 out of range"),
    ("propensity outside (0, 1]", {"served": "knn", "propensity": 1.5}, "item 1: propensity: Value error, must be in (0, 1]"),
    ("propensity without served", {"propensity": 0.5}, "item 1: propensity: a propensity needs the served member"),
    ("served not among the outputs", {"served": "mlp"}, "item 1: served: 'mlp' is not one of the outputs"),
    ("bad request id", {"request_id": "a b"}, "item 1: request_id: Value error, character U+0020"),
    ("undeclared subgroup", {"subgroups": {"colour": "red"}}, "item 1: subgroups.colour: not a declared"),
    ("unknown field", {"colour": 1}, "item 1: colour: Extra inputs are not permitted"),
    ("duplicate id with other outputs", {"request_id": "log-0", "outputs": {"knn": "bad", "logreg": "bad",
                                         "forest": "bad", "gboost": "bad", "mlp": "bad"}},
     "stored already with other outputs"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_records_get_a_422_and_nothing_is_applied(env, case):
    app, host, csv_path = env
    _, change, message = case
    rows = _rows(csv_path)
    if change.get("request_id") == "log-0" and not host.store.get_outcomes(["log-0"]):
        pytest.skip("needs the log of the test above")
    if change.get("request_id") == "log-0":  # make its outputs differ from the stored ones
        stored = host.store.get_outcomes(["log-0"])["log-0"]
        change = {**change, "outputs": {m: ("bad" if stored.predictions[a] == 1 else "good")
                                        for a, m in enumerate(MEMBERS)}}
    good = {"request_id": "fresh-1", "ecosystem": "credit_log", "outputs": {"knn": rows[0]["knn"]}}
    bad = {"request_id": "fresh-2", "ecosystem": "credit_log", "outputs": {"knn": "good"}, **change}
    before = host.store.count_outcomes()
    r = post(app, "/v2/outcomes", {"outcomes": [good, bad]})
    assert r.status_code == 422, r.text
    assert message in r.json()["error"], r.json()
    assert host.store.count_outcomes() == before  # nothing half-applied


def test_a_mixed_ecosystem_takes_outcomes_for_its_external_members_only(env, serving_repo):
    app, host, _ = env
    r = post(app, "/v2/outcomes", {"outcomes": [{"request_id": "m-1", "ecosystem": "mixed",
                                                  "outputs": {"mlp_a": "3"}}]})
    assert r.status_code == 422 and "not an external member (it is served here)" in r.json()["error"]
    r = post(app, "/v2/outcomes", {"outcomes": [{"request_id": "m-1", "ecosystem": "mixed", "outputs": {"vendor": "3"}}]})
    assert r.status_code == 200, r.text
    # the served ecosystem still answers, with its external member missing from its own records
    from models.heldout import load_heldout

    r = post(app, "/v2/models/mixed/infer", infer_body(load_heldout(serving_repo / "digits").X[:1], id="m-2"))
    assert r.status_code == 200, r.text
    got = host.store.get_outcomes(["m-1", "m-2"])
    assert got["m-1"].predictions == [-1, -1, 3] and got["m-2"].members == ("logreg", "mlp_a")


def test_import_outcomes_posts_a_log_and_its_labels(env, tmp_path):
    from ecoserve.importer import ImportError_, import_outcomes

    app, host, csv_path = env
    rows = _rows(csv_path)[:50]
    table = tmp_path / "log.csv"
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["request_id", *rows[0]])
        w.writeheader()
        for i, row in enumerate(rows):
            w.writerow({"request_id": f"imp-{i}", **row})

    async def go(path=table, **kw):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            opts = {"group_columns": ("sex", "age_group"), **kw}
            return await import_outcomes(path, "credit_log", None, client, **opts)

    before = value(host.recorder, "ecoserve_labeled_outcomes_total", ecosystem="credit_log", source="observed",
                   subgroup="all", subgroup_value="all") or 0
    result = asyncio.run(go())
    assert (result.outcomes, result.recorded, result.unchanged, result.labels) == (50, 50, 0, 50)
    assert value(host.recorder, "ecoserve_labeled_outcomes_total", ecosystem="credit_log", source="observed",
                 subgroup="all", subgroup_value="all") == before + 50
    assert asyncio.run(go()).unchanged == 50  # again: nothing new
    bad = tmp_path / "bad.csv"
    bad.write_text("request_id,label,zz\nx-1,good,good\n")
    with pytest.raises(ImportError_, match="HTTP 422: item 0: outputs.zz: not a member"):
        asyncio.run(go(bad, group_columns=()))


def test_a_served_outcome_is_completed_by_its_external_members_output(env, serving_repo):
    """A mixed ecosystem serves a request; the external member's output arrives later under the
    same request id: the record is completed (not duplicated) and re-counted as complete."""
    import numpy as np

    from models.heldout import load_heldout

    app, host, _ = env
    rec = host.recorder
    x = load_heldout(serving_repo / "digits").X[:1]
    r = post(app, "/v2/models/mixed/infer", infer_body(x, id="c-1"))
    assert r.status_code == 200, r.text
    served_label = r.json()["outputs"][0]["data"][0]
    before = rec.snapshot().ecosystems["mixed"]
    assert host.store.get_outcomes(["c-1"])["c-1"].members == ("logreg", "mlp_a")
    r = post(app, "/v2/outcomes", {"outcomes": [{"request_id": "c-1", "ecosystem": "mixed",
                                                  "outputs": {"vendor": str(served_label)}}]})
    assert r.status_code == 200 and r.json()["completed"] == 1 and r.json()["recorded"] == 0, r.text
    got = host.store.get_outcomes(["c-1"])["c-1"]
    assert got.members == ("logreg", "mlp_a", "vendor") and got.predictions[2] == served_label
    after = rec.snapshot().ecosystems["mixed"]
    assert after.outcomes == before.outcomes  # completed, not duplicated
    assert after.predictions.n_predicted == before.predictions.n_predicted + 1  # complete now
    assert after.incomplete == before.incomplete - 1
    assert after.missing[2] == before.missing[2] - 1
    mlp_a_vendor = after.predictions.agree[1, 2] - before.predictions.agree[1, 2]
    assert mlp_a_vendor == 1  # mlp_a served that label, and the vendor said the same
    # the counts equal a recorder rebuilt from the store (restart safety)
    from telemetry.recorder import Recorder

    rebuilt = Recorder(rec.specs, host.store).snapshot().ecosystems["mixed"]
    assert rebuilt.predictions.equals(after.predictions)
    assert np.array_equal(rebuilt.missing, after.missing) and rebuilt.incomplete == after.incomplete
    # a replay changes nothing; a labeled outcome can no longer be completed
    r = post(app, "/v2/outcomes", {"outcomes": [{"request_id": "c-1", "ecosystem": "mixed",
                                                  "outputs": {"vendor": str(served_label)}}]})
    assert r.json()["unchanged"] == 1 and r.json()["completed"] == 0
    r = post(app, "/v2/models/mixed/infer", infer_body(x, id="c-2"))
    assert post(app, "/v2/feedback", {"request_id": "c-2", "label": "0"}).status_code == 200
    r = post(app, "/v2/outcomes", {"outcomes": [{"request_id": "c-2", "ecosystem": "mixed", "outputs": {"vendor": "1"}}]})
    assert r.status_code == 422 and "is labeled already" in r.json()["error"], r.text
