"""Per-request risk, for recourse: once the recorder has fitted its label-free estimator, a
gateway receives it with a hand-over reply and every inference row carries
`systemic_failure_risk`, equal to the estimator's own value for that row. The real HTTP app and
ONNX Runtime members of the credit ecosystem, a real recorder (SQLite), labels posted through the
feedback API; no Ray (the hand-over reply is the recorder host's own)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import serving_args

from models.heldout import load_heldout
from models.runtime import load_member
from serving.config import parse_serving
from serving.dataplane import Dataplane
from serving.http import build_http_app
from serving.members import LocalMember
from serving.recording.host import LocalTelemetry, RecorderHost, recorder_specs


def post(app: Any, path: str, body: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(path, content=json.dumps(body).encode())

    return asyncio.run(go())


def infer_body(x: np.ndarray, rid: str) -> dict[str, Any]:
    return {"id": rid, "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}


def test_rows_carry_the_fitted_estimators_risk(serving_repo: Path, tmp_path: Path) -> None:
    args = serving_args(serving_repo)
    args["ecosystems"] = {"credit": {"policy": {"kind": "primary", "primary": "logreg"}}}
    args["telemetry"] = {"store_url": f"sqlite:///{tmp_path / 'o.db'}"}
    args["limits"] = {"max_rows_per_request": 1000}
    cfg = parse_serving(args)
    host = RecorderHost(recorder_specs(cfg), cfg.telemetry.model_dump(mode="json"))
    try:
        dataplane = Dataplane.build(cfg, lambda d, m, s: LocalMember(load_member(d, m, s, "cpu")),
                                    sink=lambda o: host.record(o, "t", {}))
        app = build_http_app(dataplane, LocalTelemetry(host))
        held = load_heldout(serving_repo / "credit")
        x, y = held.X.astype(np.float32), held.y
        # before any estimator: no risk in the answer
        r = post(app, "/v2/models/credit/infer", infer_body(x[:2], "early"))
        assert r.status_code == 200 and "systemic_failure_risks" not in r.json()["parameters"]
        # the reference: every held-out row served, then labeled
        r = post(app, "/v2/models/credit/infer", infer_body(x, "ref"))
        assert r.status_code == 200, r.text
        ids = r.json()["parameters"]["request_ids"]
        got = post(app, "/v2/feedback", {"labels": [{"request_id": i, "label": int(v)} for i, v in zip(ids, y)]})
        assert got.status_code == 200, got.text
        assert host.recorder.refresh_estimates()["credit"] >= 0
        est = host.recorder.estimators["credit"]
        # a hand-over reply carries it to the gateway, once (the gateway then reports its version)
        reply = host.record_fields([], "gw", {"serving": {"estimator_versions": {}}})
        assert set(reply["estimators"]) == {"credit"}
        dataplane.apply_estimators(reply["estimators"])
        again = host.record_fields([], "gw", {"serving": {"estimator_versions": {"credit": est.version}}})
        assert again["estimators"] == {}
        # now every row says how likely it is that every member is wrong on it
        r = post(app, "/v2/models/credit/infer", infer_body(x[:40], "late"))
        risks = np.array(r.json()["parameters"]["systemic_failure_risks"])
        outcomes = host.store.get_outcomes([f"late/{i}" for i in range(40)])
        rows = [outcomes[f"late/{i}"] for i in range(40)]
        preds = np.array([o.predictions for o in rows])
        scores = np.array([[np.nan if v is None else v for v in o.scores] for o in rows])
        served = np.array([o.served for o in rows])
        # the same rows, offline, from what the store kept (the gateway computed the risk from the
        # same 4-digit scores it recorded, so they agree to float precision, bin edges included)
        print("DBG", np.abs(risks - est.risk(preds, scores, served)).max(), np.argmax(np.abs(risks - est.risk(preds, scores, served))))
        assert np.allclose(risks, est.risk(preds, scores, served), rtol=0, atol=5.001e-5)  # answered to 4 decimals
        one = post(app, "/v2/models/credit/infer", infer_body(x[:1], "one")).json()["parameters"]
        assert one["systemic_failure_risk"] == one["systemic_failure_risks"][0]
        # the risk ranks rows: on the labeled reference, the riskiest tenth fails together more often
        ref = host.store.get_outcomes(ids)
        refs = [ref[i] for i in ids]
        p = est.risk(np.array([o.predictions for o in refs]),
                     np.array([[np.nan if v is None else v for v in o.scores] for o in refs]),
                     np.array([o.served for o in refs]))
        wrong = np.array([all(v != int(t) for v in o.predictions) for o, t in zip(refs, y)])
        top = np.argsort(-p)[: len(p) // 10]
        print(f"risk top decile: {wrong[top].mean():.3f} vs all rows {wrong.mean():.3f}")
        assert wrong.mean() > 0 and wrong[top].mean() >= 2 * wrong.mean(), (wrong[top].mean(), wrong.mean())
    finally:
        host.close()


@pytest.mark.parametrize("text", ["{", '{"members": ["a"]}', "[]"])
def test_an_unreadable_estimator_is_ignored(serving_repo: Path, text: str) -> None:
    args = serving_args(serving_repo)
    cfg = parse_serving(args)
    dataplane = Dataplane.build(cfg, lambda d, m, s: LocalMember(load_member(d, m, s, "cpu")))
    dataplane.apply_estimators({"credit": text, "nope": text})
    assert dataplane.runners["credit"].estimator is None
