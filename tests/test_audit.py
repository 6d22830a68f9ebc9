"""`GET /v2/ecosystems/{name}/audit?kind=systemic|cie&limit=N`: the audit lists, equal to a count
by hand from ONNX Runtime's own outputs, behind the label token and its scope. The real HTTP app,
ONNX Runtime members and a real recorder on SQLite and PostgreSQL (the `edge` fixture of
tests/test_security.py); no Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from test_security import ALL_TOKEN, CREDIT_TOKEN, INFER_TOKEN, Edge, bearer, edge  # noqa: F401 - the fixture

from models.heldout import load_heldout
from telemetry.counts import EcosystemShape, cie_mask


def ort_labels(repo: Path, eco: str, member: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(repo / f"{eco}/{member}/1/model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["label"], {"input": x.astype(np.float32)})[0].reshape(-1).astype(np.int64)


def send(e: Edge, eco: str, x: np.ndarray, prefix: str) -> list[str]:
    body = {"id": prefix, "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                      "data": x.reshape(-1).tolist()}]}
    r = e.request("POST", f"/v2/models/{eco}/infer", body, bearer(INFER_TOKEN))
    assert r.status_code == 200, r.text
    ids: list[str] = r.json()["parameters"]["request_ids"]
    return ids


def audit(e: Edge, eco: str, query: str = "", token: str | None = ALL_TOKEN) -> Any:
    return e.request("GET", f"/v2/ecosystems/{eco}/audit{query}", headers=bearer(token) if token else None)


def test_systemic_and_cie_lists_equal_a_count_by_hand(edge: Edge, serving_repo: Path) -> None:  # noqa: F811
    held = load_heldout(serving_repo / "credit")
    x, y = held.X[:120], held.y[:120]
    ids = send(edge, "credit", x, "a")
    r = edge.request("POST", "/v2/feedback", {"labels": [{"request_id": i, "label": int(v)} for i, v in zip(ids, y)]},
                     bearer(ALL_TOKEN))
    assert r.status_code == 200, r.text
    members = ["logreg", "forest", "gboost", "mlp", "knn"]
    preds = np.stack([ort_labels(serving_repo, "credit", m, x) for m in members], axis=1)
    systemic = {ids[i] for i in np.flatnonzero((preds != y[:, None]).all(axis=1))}
    assert systemic  # the held-out slice has some
    got = audit(edge, "credit", "?kind=systemic&limit=1000")
    assert got.status_code == 200, got.text
    body = got.json()
    assert {it["request_id"] for it in body["items"]} == systemic and body["scanned"] == len(ids)
    classes = ["bad", "good"]
    one = body["items"][0]
    i = ids.index(one["request_id"])
    assert one["outputs"] == {m: classes[int(preds[i, a])] for a, m in enumerate(members)}
    assert one["label"] == classes[int(y[i])] and one["label_source"] == "observed" and one["served"] in members
    # newest first, and limit cuts the list
    two = audit(edge, "credit", "?limit=2").json()["items"]
    assert len(two) == min(2, len(systemic)) and two == body["items"][:2]
    # label-free: the digits ecosystem's INT8 copy of mlp_a against the uncompressed members
    dig = load_heldout(serving_repo / "digits").X[:200]
    dids = send(edge, "digits", dig, "d")
    names = ["logreg", "mlp_a", "mlp_b", "forest", "knn", "mlp_a_int8"]
    dpreds = np.stack([ort_labels(serving_repo, "digits", m, dig) for m in names], axis=1)
    shape = EcosystemShape(members=tuple(names), n_classes=10, compressed=(False,) * 5 + (True,))
    want = {dids[i] for i in np.flatnonzero(cie_mask(dpreds, shape))}
    cie = audit(edge, "digits", "?kind=cie&limit=10000").json()
    assert {it["request_id"] for it in cie["items"]} == want and cie["scanned"] == len(dids)


def test_bad_audit_requests_get_clear_errors(edge: Edge) -> None:  # noqa: F811
    assert edge.infer("credit", "c1").status_code == 200
    for query, token, status, message in [
        ("", None, 401, "Bearer"),
        ("", "wrong", 401, "the bearer token is wrong"),
        ("", INFER_TOKEN, 401, "the bearer token is wrong"),
        ("?kind=nope", ALL_TOKEN, 422, "kind: expected one of systemic, cie, got 'nope'"),
        ("?limit=0", ALL_TOKEN, 422, "limit: expected 1 to 10000, got 0"),
        ("?limit=10001", ALL_TOKEN, 422, "limit: expected 1 to 10000"),
        ("?limit=abc", ALL_TOKEN, 422, "limit: expected an integer, got 'abc'"),
        ("?limit=%00", ALL_TOKEN, 422, "limit: expected an integer"),
        ("?kind=cie", ALL_TOKEN, 422, "'credit' has no compressed member"),
    ]:
        r = audit(edge, "credit", query, token)
        assert r.status_code == status and message in r.json()["error"], (query, r.status_code, r.text)
    # a token scoped to credit sees credit's lists, not digits'
    assert audit(edge, "credit", "", CREDIT_TOKEN).status_code == 200
    r = audit(edge, "digits", "", CREDIT_TOKEN)
    assert r.status_code == 403 and "does not cover ecosystem 'digits'" in r.json()["error"]
    r = audit(edge, "nope", "", ALL_TOKEN)
    assert r.status_code == 404 and "'nope' is not served here" in r.json()["error"]
    # nothing leaks into the answers: no token in any header or body
    assert not any(t in a for a in edge.answers for t in (ALL_TOKEN, CREDIT_TOKEN, INFER_TOKEN))
