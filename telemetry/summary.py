"""Ecosystem metrics derived from additive counts (docs/design.md, "Metric definitions").

Every ratio here is computed from `EcosystemCounts`, never stored: the batch
analysis, the streaming recorder's scrape-time `Collector` and the tests all go
through `summarize`. Undefined values (nothing counted, a zero denominator) are
`None`, never 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from telemetry.counts import EcosystemCounts, group_keys
from telemetry.poisson_binomial import poisson_binomial_pmf

__all__ = ["summarize", "kappa_matrix", "DEFAULT_RASHOMON_EPSILON"]

# Members within this accuracy of the best form the multiplicity set (Marx,
# Calmon, Ustun 2020 call it the epsilon-Rashomon set). 0.05 keeps the demo
# ecosystems' near-equal members in the set and drops a clearly weaker one.
DEFAULT_RASHOMON_EPSILON = 0.05


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def kappa_matrix(counts: EcosystemCounts) -> list[list[float | None]]:
    """Cohen's kappa per member pair: (A - p_e) / (1 - p_e), p_e from predicted-class frequencies."""
    m, n = counts.shape.m, counts.n_predicted
    out: list[list[float | None]] = [[None] * m for _ in range(m)]
    if n == 0:
        return out
    freq = counts.class_counts / n
    pe = freq @ freq.T
    agree = counts.agree / n
    for a in range(m):
        for b in range(m):
            den = 1.0 - pe[a, b]
            # p_e == 1: both members predict one and the same class throughout; kappa is undefined.
            out[a][b] = None if den <= 1e-12 else float((agree[a, b] - pe[a, b]) / den)
    return out


def _label_part(counts: EcosystemCounts) -> dict[str, Any]:
    m = counts.shape.m
    names = counts.shape.members
    n_c = counts.n_complete
    acc = {names[a]: _ratio(counts.member_correct[a], counts.member_n[a]) for a in range(m)}
    out: dict[str, Any] = {
        "n": counts.n_labeled,
        "n_complete": n_c,
        "n_incomplete": counts.n_labeled - n_c,
        "accuracy": acc,
    }
    if n_c == 0:
        out.update(
            systemic_failure_rate=None,
            consistent_success_rate=None,
            homogeneous_outcome_rate=None,
            independence_baseline={"systemic_failure_rate": None, "consistent_success_rate": None},
            homogeneity_excess={"systemic_failure_rate": None, "consistent_success_rate": None},
            homogeneity_ratio={"systemic_failure_rate": None, "consistent_success_rate": None},
            failures_per_instance={"observed": None, "independent": None},
            error_rate_complete={names[a]: None for a in range(m)},
        )
        return out
    observed = counts.k_hist / n_c
    err = 1.0 - counts.complete_correct / n_c
    independent = poisson_binomial_pmf(err)
    sfr, csr = float(observed[m]), float(observed[0])
    base_sfr, base_csr = float(np.prod(err)), float(np.prod(1.0 - err))
    out.update(
        systemic_failure_rate=sfr,
        consistent_success_rate=csr,
        homogeneous_outcome_rate=sfr + csr,
        independence_baseline={"systemic_failure_rate": base_sfr, "consistent_success_rate": base_csr},
        homogeneity_excess={"systemic_failure_rate": sfr - base_sfr, "consistent_success_rate": csr - base_csr},
        homogeneity_ratio={
            "systemic_failure_rate": _ratio(sfr, base_sfr),
            "consistent_success_rate": _ratio(csr, base_csr),
        },
        failures_per_instance={"observed": observed.tolist(), "independent": independent.tolist()},
        error_rate_complete={names[a]: float(err[a]) for a in range(m)},
    )
    return out


def rashomon_set(counts: EcosystemCounts, epsilon: float) -> list[int]:
    """Members within epsilon of the best accuracy; all members when no labels are known."""
    m = counts.shape.m
    accs = [_ratio(counts.member_correct[a], counts.member_n[a]) for a in range(m)]
    known = [a for a in accs if a is not None]
    if not known:
        return list(range(m))
    best = max(known)
    return [a for a in range(m) if accs[a] is not None and accs[a] >= best - epsilon - 1e-12]  # type: ignore[operator]


def _label_free_part(counts: EcosystemCounts, epsilon: float) -> dict[str, Any]:
    shape = counts.shape
    names = shape.members
    n = counts.n_predicted
    kap = kappa_matrix(counts)
    agreement = {
        names[a]: {names[b]: _ratio(counts.agree[a, b], n) for b in range(shape.m)} for a in range(shape.m)
    }
    rset = rashomon_set(counts, epsilon)
    mask = sum(1 << a for a in rset)
    amb = sum(c for bits, c in counts.disagree_patterns.items() if bits & mask)
    per_member = {a: sum(c for bits, c in counts.disagree_patterns.items() if bits >> a & 1) for a in rset}
    return {
        "n_outcomes": counts.n_outcomes,
        "n_predicted": n,
        "agreement": agreement,
        "kappa": {names[a]: {names[b]: kap[a][b] for b in range(shape.m)} for a in range(shape.m)},
        "unanimity_rate": _ratio(counts.unanimous, n),
        "reference": names[shape.reference],
        "rashomon_set": [names[a] for a in rset],
        "ambiguity": _ratio(amb, n),
        "discrepancy": (max(per_member.values()) / n) if n and per_member else None,
        "cie_rate": _ratio(counts.cie, n) if shape.has_cie else None,
        "cie_count": counts.cie if shape.has_cie else None,
    }


def summarize(
    counts: EcosystemCounts, epsilon: float = DEFAULT_RASHOMON_EPSILON, *, include_groups: bool = True
) -> dict[str, Any]:
    """Every ecosystem metric of docs/design.md that counts determine, as a JSON-able dict."""
    out: dict[str, Any] = {"members": list(counts.shape.members)}
    out.update(_label_part(counts))
    out.update(_label_free_part(counts, epsilon))
    if include_groups:
        # every declared attribute and intersection is present, empty when nothing was counted
        out["groups"] = {
            key: {
                value: summarize(sub, epsilon, include_groups=False)
                for value, sub in sorted(counts.groups.get(key, {}).items())
            }
            for key, _attrs in group_keys(counts.shape)
        }
    return out
