"""`python -m bench estimation`: what label-free estimates cost, each against a baseline measured in
the same run.

- storage: bytes per stored outcome payload with members' scores vs without (6 members), and with
  each member's full score vector over 10 classes (`telemetry.score_vector_max_classes`);
- recording: `RowEncoder.rows_of_fields` per outcome with scores vs without, and with vectors;
- refit: `SystemicEstimator.fit` on 100,000 labeled outcomes (6 members), against one pass of
  plain logistic-regression features over the same rows (the floor of reading them once);
- refresh: `Recorder.refresh_estimates` over 20,000 waiting outcomes in a real SQLite store,
  against reading those outcomes back from the store (`recent_outcomes`, the part it cannot skip);
- per-request risk: the estimator's risk for a request's rows, against running the ecosystem's
  6 ONNX members on those rows (what the request costs anyway), for 1 and 64 rows.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from telemetry.estimation import SystemicEstimator, features
from telemetry.recorder import LabelItem, Recorder
from telemetry.records import Outcome, RowEncoder, outcome_fields
from telemetry.spec import EcosystemSpec
from telemetry.store import open_store

MEMBERS = ("a", "b", "c", "d", "e", "f")


def _best(fn: Callable[[], object], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _simulate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = np.where(rng.random(n) < 0.2, rng.normal(1.0, 0.7, n), rng.normal(-1.5, 0.7, n))
    wrong = rng.random((n, 6)) < 1 / (1 + np.exp(-(2.0 * d[:, None] + rng.normal(0, 1.5, n)[:, None])))
    truth = rng.integers(0, 10, n)
    preds = np.where(wrong, (truth[:, None] + rng.integers(1, 3, (n, 6))) % 10, truth[:, None])
    scores = np.clip(1 / (1 + np.exp(-(np.where(wrong, 0.5, 2.5) - 1.2 * d[:, None]))), 0.01, 0.99)
    return preds, scores, truth, (~wrong).astype(np.int64)


def _outcomes(preds: np.ndarray, scores: np.ndarray | None, prefix: str, t0: float,
              vectors: np.ndarray | None = None) -> list[Outcome]:
    return [Outcome(f"{prefix}{i}", "eco", t0 + i * 1e-3, MEMBERS, ("1",) * 6, tuple(int(v) for v in preds[i]), 0, 0,
                    (1.0, 0, 0, 0, 0, 0), 0, "primary", False, {}, f"{i:016x}",
                    tuple(float(v) for v in scores[i]) if scores is not None else (),
                    tuple(tuple(v) for v in vectors[i].tolist()) if vectors is not None else ())
            for i in range(len(preds))]


def _vectors(preds: np.ndarray, scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, M, 10) probability vectors whose argmax is the prediction, with its score."""
    rest = rng.dirichlet(np.ones(9), size=preds.shape) * (1 - scores)[..., None]
    out = np.insert(rest, 0, scores, axis=-1)  # the score first, then rolled onto the predicted class
    idx = (np.arange(10)[None, None, :] - preds[..., None]) % 10
    return np.take_along_axis(out, idx, axis=-1).astype(np.float32)


def run(repo: Path | None = None) -> Sequence[tuple[str, ...]]:
    rng = np.random.default_rng(0)
    rows: list[tuple[str, ...]] = []
    preds, scores, truth, correct = _simulate(100_000, rng)

    # storage and recording
    with_s = [outcome_fields(o) for o in _outcomes(preds[:20_000], scores[:20_000], "s", 1e9)]
    without = [outcome_fields(o) for o in _outcomes(preds[:20_000], None, "s", 1e9)]
    with_v = [outcome_fields(o) for o in _outcomes(preds[:20_000], scores[:20_000], "s", 1e9,
                                                   _vectors(preds[:20_000], scores[:20_000], rng))]
    enc = RowEncoder()
    b_with = np.mean([len(r[4]) for r in enc.rows_of_fields(with_s, lambda *_: 1)])
    b_without = np.mean([len(r[4]) for r in enc.rows_of_fields(without, lambda *_: 1)])
    b_vec = np.mean([len(r[4]) for r in enc.rows_of_fields(with_v, lambda *_: 1)])
    rows.append(("payload bytes per outcome (6 members)", f"{b_with:.0f}", f"{b_without:.0f} without scores",
                 f"{b_with / b_without:.2f}x"))
    rows.append(("payload bytes, with 6 full score vectors (10 classes)", f"{b_vec:.0f}",
                 f"{b_without:.0f} without scores", f"{b_vec / b_without:.2f}x"))
    t_with = _best(lambda: RowEncoder().rows_of_fields(with_s, lambda *_: 1)) / len(with_s)
    t_without = _best(lambda: RowEncoder().rows_of_fields(without, lambda *_: 1)) / len(without)
    rows.append(("encoding an outcome for the store", f"{t_with * 1e6:.2f} us", f"{t_without * 1e6:.2f} us without scores",
                 f"{t_with / t_without:.2f}x"))
    t_vec = _best(lambda: RowEncoder().rows_of_fields(with_v, lambda *_: 1)) / len(with_v)
    rows.append(("encoding, with 6 full score vectors (10 classes)", f"{t_vec * 1e6:.2f} us",
                 f"{t_without * 1e6:.2f} us without scores", f"{t_vec / t_without:.2f}x"))

    # refit on 100k labeled outcomes
    served = np.zeros(len(preds), dtype=np.int64)
    t_fit = _best(lambda: SystemicEstimator.fit(MEMBERS, preds, scores, served, correct), repeat=2)
    t_feat = _best(lambda: features(scores, preds, served))
    rows.append(("refit on 100,000 labeled outcomes", f"{t_fit:.2f} s", f"{t_feat:.3f} s for one feature pass",
                 f"{t_fit / t_feat:.0f}x"))

    # refresh over 20k waiting outcomes in a real SQLite store
    with tempfile.TemporaryDirectory() as d:
        spec = EcosystemSpec(name="eco", members=MEMBERS, classes=tuple(str(i) for i in range(10)), subgroups={})
        now = [time.time()]
        rec = Recorder({"eco": spec}, open_store(f"sqlite:///{d}/o.db"), clock=lambda: now[0], window_s=1e9)
        try:
            ref = _outcomes(preds[:20_000], scores[:20_000], "r", now[0] - 500)
            for i in range(0, len(ref), 5000):
                rec.record(ref[i:i + 5000])
            for i in range(0, 20_000, 5000):
                rec.feedback([LabelItem(f"r{k}", int(truth[k])) for k in range(i, i + 5000)])
            waiting = _outcomes(preds[20_000:40_000], scores[20_000:40_000], "w", now[0] - 100)
            for i in range(0, len(waiting), 5000):
                rec.record(waiting[i:i + 5000])
            t0 = time.perf_counter()
            rec.refresh_estimates()  # the first: fits too
            t_first = time.perf_counter() - t0
            t_refresh = _best(rec.refresh_estimates)
            t_read = _best(lambda: [rec.store.recent_outcomes("eco", labeled=False, limit=5000, offset=k)
                                    for k in range(0, 20_000, 5000)])
        finally:
            rec.store.close()
    rows.append(("refresh: 20,000 waiting outcomes (SQLite)", f"{t_refresh:.2f} s (first, with the fit: {t_first:.2f} s)",
                 f"{t_read:.2f} s to read them back", f"{t_refresh / t_read:.2f}x"))

    # per-request risk vs the members' own inference
    est = SystemicEstimator.fit(MEMBERS, preds[:20_000], scores[:20_000], served[:20_000], correct[:20_000])
    assert est is not None
    members = _members(repo)
    for n in (1, 64):
        t_risk = _best(lambda n=n: est.risk(preds[:n], scores[:n], served[:n]), repeat=200)  # type: ignore[misc]
        if members is not None:
            t_inf = _best(lambda n=n: [m(members[0][:n]) for m in members[1]], repeat=50)  # type: ignore[misc]
            rows.append((f"per-request risk, {n} row(s)", f"{t_risk * 1e6:.0f} us",
                         f"{t_inf * 1e6:.0f} us: the 6 digits members on the same rows", f"{t_risk / t_inf:.2f}x"))
        else:
            rows.append((f"per-request risk, {n} row(s)", f"{t_risk * 1e6:.0f} us", "no model repository", "-"))
    return rows


def _members(repo: Path | None) -> tuple[np.ndarray, list[Callable[[np.ndarray], object]]] | None:
    if repo is None or not (repo / "digits").is_dir():
        return None
    from models.heldout import load_heldout
    from models.manifest import load_manifest
    from models.runtime import load_member

    d = repo / "digits"
    man = load_manifest(d)
    sessions = [load_member(d, man, spec, "cpu") for spec in man.current_members()]
    return load_heldout(d, man).X.astype(np.float32), [s.predict for s in sessions]
