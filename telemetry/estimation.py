"""Label-free estimates: how often members fail before their labels arrive, with intervals.

Pieces (docs/design.md, "Before the labels arrive"):

- `wilson`: the Wilson score interval of a binomial ratio (every windowed ratio's band);
- `Calibrator`: per member, histogram binning of its score for its predicted class, fitted on
  labeled outcomes and kept only when it lowers the expected calibration error (ECE) on held-out
  labeled outcomes (otherwise the raw score is used as is);
- `SystemicEstimator`: the probability that *every* member is wrong on an outcome, from what
  every outcome has without its label: each member's calibrated score, the agreement pattern and
  the served output. A logistic regression fitted on labeled outcomes (Newton's method, a small
  ridge penalty). It does not assume members fail independently given their scores: members
  fail together, and the product of their error probabilities underestimates the systemic
  failure rate several-fold. It assumes no concept shift: P(every member wrong | those features)
  is the same in the labeled reference and now; the inputs may shift (covariate shift).
- `estimate`: the estimated rate over a set of outcomes and its interval (below).

Interval of an estimated rate: the realized count of systemic failures among n unlabeled
outcomes is a sum of independent Bernoulli(p_i) given the features (a Poisson binomial), whose
variance is sum p_i (1 - p_i); the fitted model's own uncertainty adds the delta-method variance
of mean(p) under the coefficients' covariance (the inverse Hessian of the fit). A logistic model
is only an approximation of P(failure | features): its calibration residual, measured by
cross-fitting on the reference (fit on one half, compare mean predicted and realized failure per
decile of predicted risk on the other), is added as a bias bound, weighted by where the
estimated outcomes fall among those deciles. The interval is mean(p) +- (1.96 sqrt(variance) +
bias bound), clipped to [0, 1].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["wilson", "ece", "Calibrator", "SystemicEstimator", "Estimate", "EstimateSums", "features", "MIN_FIT"]

Z95 = 1.959963984540054
MIN_FIT = 200  # labeled outcomes (with every member's correctness known) needed to fit


def wilson(k: np.ndarray | float, n: np.ndarray | float, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval of k successes in n trials (n = 0: the whole [0, 1])."""
    k_arr = np.asarray(k, dtype=float)
    n_arr = np.asarray(n, dtype=float)
    safe = np.maximum(n_arr, 1.0)
    p = k_arr / safe
    denom = 1 + z * z / safe
    centre = (p + z * z / (2 * safe)) / denom
    half = z * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe)) / denom
    lo = np.where(n_arr > 0, np.clip(centre - half, 0.0, 1.0), 0.0)
    hi = np.where(n_arr > 0, np.clip(centre + half, 0.0, 1.0), 1.0)
    return lo, hi


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the count-weighted mean |mean(p) - mean(y)| over equal-width bins."""
    if len(p) == 0:
        return 0.0
    idx = np.minimum((np.asarray(p) * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() * abs(float(p[sel].mean()) - float(y[sel].mean()))
    return total / len(p)


@dataclass
class Calibrator:
    """Histogram binning of one member's score (equal-mass bins, each mapped to the accuracy seen
    in it); `edges` empty: the identity (the raw score was better calibrated on held-out data)."""

    edges: list[float] = field(default_factory=list)  # inner bin edges, increasing
    values: list[float] = field(default_factory=list)  # calibrated value per bin (len(edges) + 1)
    ece_raw: float = float("nan")
    ece_calibrated: float = float("nan")

    @property
    def identity(self) -> bool:
        return not self.values

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        s = np.asarray(scores, dtype=float)
        if self.identity:
            clipped: np.ndarray = np.clip(s, 0.0, 1.0)
            return clipped
        out: np.ndarray = np.asarray(self.values)[np.searchsorted(np.asarray(self.edges), s, side="right")]
        return out

    @staticmethod
    def _bins(scores: np.ndarray, correct: np.ndarray, n_bins: int) -> Calibrator:
        qs = np.unique(np.quantile(scores, np.linspace(0, 1, n_bins + 1)[1:-1]))
        idx = np.searchsorted(qs, scores, side="right")
        values = []
        for b in range(len(qs) + 1):
            sel = idx == b
            # a Beta(1, 1)-smoothed accuracy: an empty or tiny bin does not map to exactly 0 or 1
            values.append(float((correct[sel].sum() + 1) / (sel.sum() + 2)))
        return Calibrator(qs.tolist(), values)

    @classmethod
    def fit(cls, scores: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> Calibrator:
        """Fit on one half of the labeled outcomes (even positions), judge on the other; keep the
        binning only when it lowers the held-out ECE, then refit it on all of them."""
        s, c = np.asarray(scores, dtype=float), np.asarray(correct, dtype=float)
        ok = np.isfinite(s)
        s, c = s[ok], c[ok]
        if len(s) < 2 * n_bins:
            return cls(ece_raw=ece(np.clip(s, 0, 1), c), ece_calibrated=float("nan"))
        fit_half, held = s[::2], s[1::2]
        trial = cls._bins(fit_half, c[::2], n_bins)
        raw_e, cal_e = ece(np.clip(held, 0, 1), c[1::2]), ece(trial(held), c[1::2])
        if cal_e >= raw_e:
            return cls(ece_raw=raw_e, ece_calibrated=cal_e)
        full = cls._bins(s, c, n_bins)
        full.ece_raw, full.ece_calibrated = raw_e, cal_e
        return full


def features(cal: np.ndarray, preds: np.ndarray, served: np.ndarray) -> np.ndarray:
    """The estimator's inputs for n outcomes of m members, all known without labels: each
    member's calibrated score (a missing one: the mean of the others), their mean, min and max,
    the share of members agreeing with the majority answer, the number of distinct answers
    over m, whether the served output is the majority's, and a constant."""
    n, m = preds.shape
    cal = np.array(cal, dtype=float)
    missing = ~np.isfinite(cal) | (preds < 0)
    present = (~missing).sum(axis=1)
    row_mean = np.where(missing, 0.0, cal).sum(axis=1) / np.maximum(present, 1)
    row_mean = np.where(present > 0, row_mean, 0.5)
    cal = np.where(missing, row_mean[:, None], cal)
    # answers counted per row (one-hot over classes): the majority's share, distinct answers
    valid = preds >= 0
    width = int(preds.max()) + 1 if valid.any() else 1
    counts = np.zeros((n, width))
    rows, cols = np.nonzero(valid)
    np.add.at(counts, (rows, preds[rows, cols]), 1.0)
    top = counts.argmax(axis=1)  # ties: the smallest class
    majority_share = counts.max(axis=1) / m if m else np.zeros(n)
    distinct = (counts > 0).sum(axis=1) / m if m else np.zeros(n)
    ok = (served >= 0) & (served < m) & valid.any(axis=1)
    served_pred = preds[np.arange(n), np.clip(served, 0, max(m - 1, 0))]
    served_major = (ok & (served_pred == top) & (served_pred >= 0)).astype(float)
    return np.column_stack([np.ones(n), cal, cal.mean(axis=1), cal.min(axis=1), cal.max(axis=1),
                            majority_share, distinct, served_major])


def _logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-2, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of a ridge-penalised logistic regression (Newton), and their covariance."""
    n, k = x.shape
    w = np.zeros(k)
    penalty = ridge * np.eye(k)
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    h = penalty
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        g = x.T @ (p - y) + penalty @ w
        h = (x * (p * (1 - p))[:, None]).T @ x + penalty + 1e-9 * np.eye(k)
        step = np.linalg.solve(h, g)
        w -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return w, np.linalg.inv(h)


@dataclass
class EstimateSums:
    """Additive sums of an estimate over a set of outcomes: read in chunks, add, then finish."""

    n: int
    p: float
    pq: float
    grad: np.ndarray
    bins: np.ndarray
    member_n: np.ndarray
    member_q: np.ndarray
    member_qq: np.ndarray

    @classmethod
    def zero(cls, k: int, n_bins: int, m: int) -> EstimateSums:
        return cls(0, 0.0, 0.0, np.zeros(k), np.zeros(n_bins), np.zeros(m), np.zeros(m), np.zeros(m))

    def __add__(self, o: EstimateSums) -> EstimateSums:
        return EstimateSums(self.n + o.n, self.p + o.p, self.pq + o.pq, self.grad + o.grad, self.bins + o.bins,
                            self.member_n + o.member_n, self.member_q + o.member_q, self.member_qq + o.member_qq)


@dataclass
class Estimate:
    value: float
    lower: float
    upper: float
    n: int


@dataclass
class SystemicEstimator:
    """P(every member wrong) from label-free features, fitted on labeled outcomes (module doc)."""

    members: tuple[str, ...]
    calibrators: list[Calibrator]
    coef: np.ndarray
    cov: np.ndarray
    n_fit: int
    base_rate: float  # the systemic failure rate of the reference it was fitted on
    fitted_at: float = 0.0
    version: int = 0
    risk_edges: list[float] = field(default_factory=list)  # deciles of predicted risk on the reference
    residual: list[float] = field(default_factory=list)  # |realized - predicted| per decile, held out

    @classmethod
    def fit(cls, members: tuple[str, ...], preds: np.ndarray, scores: np.ndarray, served: np.ndarray,
            correct: np.ndarray, fitted_at: float = 0.0, version: int = 0) -> SystemicEstimator | None:
        """`correct` (n, m): 1 right, 0 wrong, -1 unknown. Fitted on rows where every member's
        correctness is known; None when fewer than MIN_FIT such rows or no failure of either kind."""
        known = (correct >= 0).all(axis=1)
        if known.sum() < MIN_FIT:
            return None
        p_, s_, v_, c_ = preds[known], scores[known], served[known], correct[known]
        cals = [Calibrator.fit(s_[:, a], c_[:, a]) for a in range(len(members))]
        y = (c_ == 0).all(axis=1).astype(float)
        if y.sum() == 0 or y.sum() == len(y):
            return None
        x = features(np.column_stack([cal(s_[:, a]) for a, cal in enumerate(cals)]), p_, v_)
        coef, cov = _logistic(x, y)
        # cross-fitted risk: each half predicted by the model fitted on the other
        held = np.empty(len(y))
        for part in (0, 1):
            train = np.arange(len(y)) % 2 != part
            w, _ = _logistic(x[train], y[train])
            held[~train] = 1.0 / (1.0 + np.exp(-np.clip(x[~train] @ w, -30, 30)))
        edges = np.unique(np.quantile(held, np.linspace(0, 1, 11)[1:-1]))
        idx = np.searchsorted(edges, held, side="right")
        residual = []
        for b in range(len(edges) + 1):
            sel = idx == b
            gap = abs(float(y[sel].mean() - held[sel].mean())) if sel.any() else 0.0
            se = math.sqrt(max(float(y[sel].mean()) * (1 - float(y[sel].mean())), 1e-4) / max(int(sel.sum()), 1))
            residual.append(max(gap - Z95 * se, 0.0))  # what sampling noise alone does not explain
        return cls(members, cals, coef, cov, int(known.sum()), float(y.mean()), fitted_at, version,
                   edges.tolist(), residual)

    def calibrated(self, scores: np.ndarray) -> np.ndarray:
        return np.column_stack([cal(scores[:, a]) for a, cal in enumerate(self.calibrators)])

    def risk(self, preds: np.ndarray, scores: np.ndarray, served: np.ndarray) -> np.ndarray:
        """P(every member wrong) per outcome."""
        x = features(self.calibrated(scores), preds, served)
        risk: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(x @ self.coef, -30, 30)))
        return risk

    def sums(self, preds: np.ndarray, scores: np.ndarray, served: np.ndarray) -> EstimateSums:
        """The additive sums an estimate over these outcomes is made of (chunks add up)."""
        n, m = preds.shape
        out = EstimateSums.zero(len(self.coef), len(self.residual), m)
        if n == 0:
            return out
        cal = self.calibrated(scores)
        x = features(cal, preds, served)
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ self.coef, -30, 30)))
        out.n = n
        out.p = float(p.sum())
        out.pq = float((p * (1 - p)).sum())
        out.grad = ((p * (1 - p))[:, None] * x).sum(axis=0)
        if self.residual:
            out.bins = np.bincount(np.searchsorted(np.asarray(self.risk_edges), p, side="right"),
                                   minlength=len(self.residual)).astype(float)
        answered = (preds >= 0) & np.isfinite(cal)
        q = np.where(answered, cal, 0.0)
        out.member_n = answered.sum(axis=0).astype(float)
        out.member_q = q.sum(axis=0)
        out.member_qq = (q * (1 - q)).sum(axis=0)
        return out

    def finish(self, t: EstimateSums) -> Estimate:
        """The estimated systemic failure rate and its interval (module doc), from its sums."""
        if t.n == 0:
            return Estimate(float("nan"), 0.0, 1.0, 0)
        grad = t.grad / t.n  # d mean(p) / d coef
        var = t.pq / (t.n * t.n) + float(grad @ self.cov @ grad)
        bias = float((t.bins / t.n) @ np.asarray(self.residual)) if self.residual else 0.0
        half = Z95 * math.sqrt(max(var, 0.0)) + bias
        mean = t.p / t.n
        return Estimate(mean, max(0.0, mean - half), min(1.0, mean + half), t.n)

    def finish_accuracy(self, t: EstimateSums) -> list[Estimate]:
        """Per member: estimated accuracy (the mean calibrated score of its predicted class) over
        the outcomes where it answered, with the Poisson-binomial interval."""
        out = []
        for a in range(len(self.members)):
            n = int(t.member_n[a]) if len(t.member_n) else 0
            if n == 0:
                out.append(Estimate(float("nan"), 0.0, 1.0, 0))
                continue
            mean = float(t.member_q[a]) / n
            half = Z95 * math.sqrt(float(t.member_qq[a])) / n
            out.append(Estimate(mean, max(0.0, mean - half), min(1.0, mean + half), n))
        return out

    def estimate(self, preds: np.ndarray, scores: np.ndarray, served: np.ndarray) -> Estimate:
        """The estimated systemic failure rate over these outcomes, with its interval (module doc)."""
        return self.finish(self.sums(preds, scores, served))

    def accuracy(self, preds: np.ndarray, scores: np.ndarray) -> list[Estimate]:
        return self.finish_accuracy(self.sums(preds, scores, np.zeros(len(preds), dtype=np.int64)))

    # ------------------------------------------------------------ persistence
    def to_json(self) -> str:
        return json.dumps({
            "members": list(self.members), "coef": self.coef.tolist(), "cov": self.cov.tolist(),
            "n_fit": self.n_fit, "base_rate": self.base_rate, "fitted_at": self.fitted_at, "version": self.version,
            "risk_edges": self.risk_edges, "residual": self.residual,
            "calibrators": [{"edges": c.edges, "values": c.values, "ece_raw": c.ece_raw,
                             "ece_calibrated": c.ece_calibrated} for c in self.calibrators],
        })

    @classmethod
    def from_json(cls, text: str) -> SystemicEstimator:
        d: dict[str, Any] = json.loads(text)
        return cls(tuple(d["members"]), [Calibrator(**c) for c in d["calibrators"]], np.asarray(d["coef"]),
                   np.asarray(d["cov"]), int(d["n_fit"]), float(d["base_rate"]), float(d["fitted_at"]),
                   int(d["version"]), list(d["risk_edges"]), list(d["residual"]))
