"""Full score vectors in the outcome record (`telemetry.score_vector_max_classes`): recorded for
ecosystems of at most that many classes, equal to ONNX Runtime's own probabilities to 4
significant digits, readable through the store and its `ecoserve_outcomes_v` view; off by default.
The real HTTP app and ONNX Runtime members, a real recorder (SQLite); no Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from conftest import local_app, serving_args
from sqlalchemy import text
from test_risk_in_responses import infer_body, post

from models.heldout import load_heldout
from serving.recording.host import RecorderHost
from telemetry.store import open_store
from telemetry.store.schema import view_sql


def serve(serving_repo: Path, db: Path, max_classes: int | None) -> tuple[Any, RecorderHost]:
    args = serving_args(serving_repo)
    args["ecosystems"] = {"credit": {"policy": {"kind": "primary", "primary": "logreg"}},
                          "digits": {"policy": {"kind": "primary", "primary": "logreg"}}}
    args["telemetry"] = {"store_url": f"sqlite:///{db}"}
    if max_classes is not None:
        args["telemetry"]["score_vector_max_classes"] = max_classes
    app, host = local_app(args)
    return app, host


def test_vectors_are_recorded_up_to_the_configured_classes(serving_repo: Path, tmp_path: Path) -> None:
    app, host = serve(serving_repo, tmp_path / "o.db", 2)
    try:
        credit = load_heldout(serving_repo / "credit").X[:8].astype(np.float32)
        digits = load_heldout(serving_repo / "digits").X[:4].astype(np.float32)
        assert post(app, "/v2/models/credit/infer", infer_body(credit, "c")).status_code == 200
        assert post(app, "/v2/models/digits/infer", infer_body(digits, "d")).status_code == 200
        got = host.store.get_outcomes([f"c/{i}" for i in range(8)] + [f"d/{i}" for i in range(4)])
        members = got["c/0"].members
        for j, name in enumerate(members):
            sess = ort.InferenceSession(str(serving_repo / f"credit/{name}/1/model.onnx"),
                                        providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            probs = sess.run(names, {"input": credit})[1]
            probs = np.array([[r[k] for k in sorted(r)] for r in probs]) if isinstance(probs, list) else probs
            for i in range(8):
                vec = got[f"c/{i}"].score_vectors[j]
                assert len(vec) == 2
                assert np.allclose(vec, probs[i], rtol=1e-3, atol=1e-4), (name, i, vec, probs[i])
                # the predicted class's score is the vector's entry at the predicted class
                assert vec[got[f"c/{i}"].predictions[j]] == got[f"c/{i}"].scores[j]
        # 10 classes > 2: only the scores of the predicted classes
        assert got["d/0"].score_vectors is None and got["d/0"].scores
        with host.store.engine.connect() as conn:
            row = conn.execute(text("SELECT score_vectors FROM ecoserve_outcomes_v WHERE request_id = 'c/0'")).scalar()
        assert json.loads(row) == got["c/0"].score_vectors
    finally:
        host.close()


def test_off_by_default(serving_repo: Path, tmp_path: Path) -> None:
    app, host = serve(serving_repo, tmp_path / "o.db", None)
    try:
        credit = load_heldout(serving_repo / "credit").X[:2].astype(np.float32)
        assert post(app, "/v2/models/credit/infer", infer_body(credit, "c")).status_code == 200
        o = host.store.get_outcomes(["c/0"])["c/0"]
        assert o.score_vectors is None and o.scores and len(o.scores) == len(o.members)
    finally:
        host.close()


def test_a_version_5_store_gets_the_new_view(tmp_path: Path) -> None:
    """A v5 store's view lacks `score_vectors`: the 5 -> 6 migration recreates it."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    store = open_store(url)
    old = view_sql("sqlite").replace(", json_extract(o.payload, '$[7]') AS score_vectors", "")
    assert old != view_sql("sqlite")
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP VIEW ecoserve_outcomes_v")
        conn.exec_driver_sql(old)
        conn.exec_driver_sql("UPDATE ecoserve_schema SET version = 5")
    store.close()
    store = open_store(url)
    try:
        with store.engine.connect() as conn:
            cols = [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(ecoserve_outcomes_v)")]
            assert "score_vectors" in cols and "scores" in cols
            assert conn.execute(text("SELECT version FROM ecoserve_schema")).scalar() == 7
    finally:
        store.close()
