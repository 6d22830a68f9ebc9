"""Randomized-exploration quantities from logged propensities (docs/design.md, "Metric definitions").

Off-policy value of serving member m, from outcomes logged under a randomized
routing policy (Horvitz-Thompson / inverse propensity scoring; SNIPS from
Swaminathan & Joachims 2015):

- output level (the full propensity vector pi(a|x) is logged):
  P_i(y) = sum_{a: yhat_ia = y} pi_ia, and w_im = [yhat_im = yhat_i,served] / P_i(yhat_im):
  a member is credited wherever the served *output* equals its own;
- action level (only pi(served|x) is logged): w_im = [served_i = m] / pi_i.

IPS_m = sum_i w_im r_i / N_m; SNIPS_m = sum_i w_im r_i / sum_i w_im;
ESS_m = (sum w)^2 / sum w^2; N_m counts rows where member m produced an output.
In ground_truth mode the reward of row i is the served member's correctness, so
IPS can be checked against the true accuracy; in bandit mode it is the logged reward.

All sums are additive: shards add up, incremental equals batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ExplorationCounts"]

_Z95 = 1.959963984540054


@dataclass
class ExplorationCounts:
    members: tuple[str, ...]
    n_classes: int
    n: int = 0
    explored: int = 0  # served member differs from the greedy one (when greedy is logged)
    n_greedy_known: int = 0
    min_propensity: float = math.inf
    member_n: np.ndarray = field(default=None)  # type: ignore[arg-type]
    sum_w: np.ndarray = field(default=None)  # type: ignore[arg-type]
    sum_wr: np.ndarray = field(default=None)  # type: ignore[arg-type]
    sum_w2: np.ndarray = field(default=None)  # type: ignore[arg-type]
    sum_w2r: np.ndarray = field(default=None)  # type: ignore[arg-type]  # sum w^2 r (intervals)
    sum_w2r2: np.ndarray = field(default=None)  # type: ignore[arg-type]  # sum (w r)^2
    served: np.ndarray = field(default=None)  # type: ignore[arg-type]
    served_propensity: np.ndarray = field(default=None)  # type: ignore[arg-type]
    served_outputs: np.ndarray = field(default=None)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        m = len(self.members)
        if self.member_n is None:
            self.member_n = np.zeros(m, dtype=np.int64)
            self.sum_w = np.zeros(m)
            self.sum_wr = np.zeros(m)
            self.sum_w2 = np.zeros(m)
            self.sum_w2r = np.zeros(m)
            self.sum_w2r2 = np.zeros(m)
            self.served = np.zeros(m, dtype=np.int64)
            self.served_propensity = np.zeros(m)
            self.served_outputs = np.zeros(self.n_classes, dtype=np.int64)

    @classmethod
    def from_arrays(
        cls,
        members: Sequence[str],
        n_classes: int,
        preds: np.ndarray,
        served: np.ndarray,
        rewards: np.ndarray,
        served_propensity: np.ndarray,
        propensities: np.ndarray | None = None,
        greedy: np.ndarray | None = None,
    ) -> ExplorationCounts:
        """preds (N, M), served (N,) member index, rewards (N,), served_propensity (N,) in (0, 1],
        propensities (N, M) for output-level weights, greedy (N,) member index or -1 unknown."""
        preds = np.asarray(preds, dtype=np.int64)
        served = np.asarray(served, dtype=np.int64)
        rewards = np.asarray(rewards, dtype=np.float64)
        pi = np.asarray(served_propensity, dtype=np.float64)
        n, m = preds.shape
        _check_propensity(pi)
        out = cls(tuple(members), n_classes)
        out.n = n
        rows = np.arange(n)
        served_out = preds[rows, served]
        if propensities is not None:
            pis = np.asarray(propensities, dtype=np.float64)
            w = np.zeros((n, m))
            for a in range(m):
                same = preds == preds[:, a : a + 1]
                p_out = (pis * same).sum(axis=1)
                hit = (preds[:, a] == served_out) & (preds[:, a] >= 0)
                w[:, a] = np.where(hit, 1.0 / np.where(p_out > 0, p_out, 1.0), 0.0)
        else:
            w = np.zeros((n, m))
            w[rows, served] = 1.0 / pi
        present = preds >= 0
        w = np.where(present, w, 0.0)
        out.member_n = present.sum(axis=0).astype(np.int64)
        out.sum_w = w.sum(axis=0)
        out.sum_wr = (w * rewards[:, None]).sum(axis=0)
        out.sum_w2 = (w * w).sum(axis=0)
        out.sum_w2r = (w * w * rewards[:, None]).sum(axis=0)
        out.sum_w2r2 = (w * w * (rewards * rewards)[:, None]).sum(axis=0)
        out.served = np.bincount(served, minlength=m).astype(np.int64)
        out.served_propensity = np.bincount(served, weights=pi, minlength=m)
        out.served_outputs = np.bincount(served_out[served_out >= 0], minlength=n_classes).astype(np.int64)
        out.min_propensity = float(pi.min()) if n else math.inf
        if greedy is not None:
            g = np.asarray(greedy, dtype=np.int64)
            known = g >= 0
            out.n_greedy_known = int(known.sum())
            out.explored = int(np.count_nonzero(known & (g != served)))
        return out

    def add(
        self,
        preds: Sequence[int],
        served: int,
        reward: float,
        served_propensity: float,
        propensities: Sequence[float] | None = None,
        greedy: int | None = None,
    ) -> None:
        """Fold one logged decision in."""
        _check_propensity(np.asarray([served_propensity]))
        m = len(self.members)
        p = [int(v) for v in preds]
        self.n += 1
        y_served = p[served]
        for a in range(m):
            if p[a] < 0:
                continue
            self.member_n[a] += 1
            if propensities is not None:
                if p[a] != y_served:
                    continue
                p_out = sum(propensities[b] for b in range(m) if p[b] == p[a])
                w = 1.0 / p_out if p_out > 0 else 0.0
            else:
                if a != served:
                    continue
                w = 1.0 / served_propensity
            self.sum_w[a] += w
            self.sum_wr[a] += w * reward
            self.sum_w2[a] += w * w
            self.sum_w2r[a] += w * w * reward
            self.sum_w2r2[a] += w * w * reward * reward
        self.served[served] += 1
        self.served_propensity[served] += served_propensity
        if y_served >= 0:
            self.served_outputs[y_served] += 1
        self.min_propensity = min(self.min_propensity, served_propensity)
        if greedy is not None and greedy >= 0:
            self.n_greedy_known += 1
            if greedy != served:
                self.explored += 1

    def __add__(self, other: ExplorationCounts) -> ExplorationCounts:
        if other.members != self.members:
            raise ValueError("cannot add exploration counts of different members")
        out = ExplorationCounts(self.members, self.n_classes)
        out.n, out.explored = self.n + other.n, self.explored + other.explored
        out.n_greedy_known = self.n_greedy_known + other.n_greedy_known
        out.min_propensity = min(self.min_propensity, other.min_propensity)
        for name in ("member_n", "sum_w", "sum_wr", "sum_w2", "sum_w2r", "sum_w2r2", "served", "served_propensity",
                     "served_outputs"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def copy(self) -> ExplorationCounts:
        return self + ExplorationCounts(self.members, self.n_classes)

    def intervals(self, a: int, rewards_in_unit: bool = True) -> dict[str, float | None]:
        """95% intervals of member `a`'s IPS and SNIPS, from the additive sums (so shards merge):
        - `ips_lower/upper`: normal, from the sample variance of the terms w r;
        - `snips_lower/upper`: normal, delta method: Var = sum w^2 (r - SNIPS)^2 / (sum w)^2;
        - `ips_bernstein_lower/upper`: the empirical Bernstein bound (Maurer and Pontil 2009,
          two-sided, delta 0.05) for terms in [0, 1 / min propensity]: valid for any n, wider;
          only with rewards in [0, 1]."""
        nm, sw, swr = float(self.member_n[a]), float(self.sum_w[a]), float(self.sum_wr[a])
        out: dict[str, float | None] = dict.fromkeys(
            ("ips_lower", "ips_upper", "snips_lower", "snips_upper", "ips_bernstein_lower", "ips_bernstein_upper"))
        if nm < 2:
            return out
        mean = swr / nm
        var = max(float(self.sum_w2r2[a]) / nm - mean * mean, 0.0) * nm / (nm - 1)  # sample variance of w r
        half = _Z95 * math.sqrt(var / nm)
        out["ips_lower"], out["ips_upper"] = mean - half, mean + half
        if sw > 0:
            sn = swr / sw
            dev = float(self.sum_w2r2[a]) - 2 * sn * float(self.sum_w2r[a]) + sn * sn * float(self.sum_w2[a])
            half = _Z95 * math.sqrt(max(dev, 0.0)) / sw
            out["snips_lower"], out["snips_upper"] = sn - half, sn + half
        if rewards_in_unit and math.isfinite(self.min_propensity):
            b = 1.0 / self.min_propensity  # every term w r lies in [0, b]
            log_term = math.log(4 / 0.05)  # two-sided: delta / 2 on each side
            half = math.sqrt(2 * var * log_term / nm) + 7 * b * log_term / (3 * (nm - 1))
            out["ips_bernstein_lower"], out["ips_bernstein_upper"] = max(mean - half, 0.0), mean + half
        return out

    def summary(self, rewards_in_unit: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n}
        per: dict[str, dict[str, float | None]] = {}
        for a, name in enumerate(self.members):
            sw, swr, sw2, nm = self.sum_w[a], self.sum_wr[a], self.sum_w2[a], self.member_n[a]
            per[name] = {
                "ips": float(swr / nm) if nm else None,
                "snips": float(swr / sw) if sw > 0 else None,
                "effective_sample_size": float(sw * sw / sw2) if sw2 > 0 else None,
                "served_share": float(self.served[a] / self.n) if self.n else None,
                "mean_propensity": float(self.served_propensity[a] / self.served[a]) if self.served[a] else None,
                **self.intervals(a, rewards_in_unit),
            }
        out["members"] = per
        out["min_propensity"] = None if math.isinf(self.min_propensity) else self.min_propensity
        out["exploration_rate"] = self.explored / self.n_greedy_known if self.n_greedy_known else None
        total = self.served_outputs.sum()
        if total:
            q = self.served_outputs[self.served_outputs > 0] / total
            out["served_output_entropy_bits"] = float(-(q * np.log2(q)).sum())
        else:
            out["served_output_entropy_bits"] = None
        return out


def _check_propensity(pi: np.ndarray) -> None:
    if pi.size and (not np.all(np.isfinite(pi)) or pi.min() <= 0 or pi.max() > 1):
        bad = pi[~np.isfinite(pi) | (pi <= 0) | (pi > 1)][0]
        raise ValueError(f"propensities must lie in (0, 1], got {bad}")
