"""Plain-Python definitions of the ecosystem metrics, written straight from the definitions in docs/design.md.

Deliberately naive (loops, no numpy) so they can be read against the definitions;
the vectorised core is tested against them.
"""

from __future__ import annotations

import itertools
import math


def mode(values):
    counts = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    best = max(counts.values())
    return min(v for v in counts if counts[v] == best)


def metrics(preds, labels, n_classes, reference=0, compressed=None, epsilon=0.05):
    """preds: list of rows (list of class ids, -1 missing); labels: list (class id, -1 unlabeled)."""
    M = len(preds[0]) if preds else 0
    out = {}
    known_rows = []  # (row preds, row correctness with None for unknown)
    for p, y in zip(preds, labels):
        c = [None if (y < 0 or v < 0) else (1 if v == y else 0) for v in p]
        known_rows.append(c)
    labeled = [c for c in known_rows if any(v is not None for v in c)]
    complete = [c for c in known_rows if all(v is not None for v in c)]
    out["n"] = len(labeled)
    out["n_complete"] = len(complete)
    acc = []
    for m in range(M):
        vals = [c[m] for c in known_rows if c[m] is not None]
        acc.append(sum(vals) / len(vals) if vals else None)
    out["accuracy"] = acc
    if complete:
        N = len(complete)
        out["sfr"] = sum(1 for c in complete if all(v == 0 for v in c)) / N
        out["csr"] = sum(1 for c in complete if all(v == 1 for v in c)) / N
        err = [1 - sum(c[m] for c in complete) / N for m in range(M)]
        out["base_sfr"] = math.prod(err)
        out["base_csr"] = math.prod(1 - e for e in err)
        out["observed"] = [sum(1 for c in complete if M - sum(c) == k) / N for k in range(M + 1)]
        out["independent"] = enumerate_independent(err)
    else:
        out["sfr"] = None
    full = [p for p in preds if all(v >= 0 for v in p)]
    n = len(full)
    out["n_predicted"] = n
    if n:
        out["agreement"] = [[sum(1 for p in full if p[a] == p[b]) / n for b in range(M)] for a in range(M)]
        kap = [[None] * M for _ in range(M)]
        for a in range(M):
            for b in range(M):
                fa = [sum(1 for p in full if p[a] == k) / n for k in range(n_classes)]
                fb = [sum(1 for p in full if p[b] == k) / n for k in range(n_classes)]
                pe = sum(x * y for x, y in zip(fa, fb))
                if 1 - pe > 1e-12:
                    kap[a][b] = (out["agreement"][a][b] - pe) / (1 - pe)
        out["kappa"] = kap
        out["unanimity"] = sum(1 for p in full if len(set(p)) == 1) / n
        known_acc = [x for x in acc if x is not None]
        if known_acc:
            best = max(known_acc)
            rset = [m for m in range(M) if acc[m] is not None and acc[m] >= best - epsilon - 1e-12]
        else:
            rset = list(range(M))
        out["ambiguity"] = sum(1 for p in full if any(p[m] != p[reference] for m in rset)) / n
        out["discrepancy"] = max(sum(1 for p in full if p[m] != p[reference]) / n for m in rset)
        if compressed and any(compressed) and not all(compressed):
            cie = 0
            for p in full:
                comp = [p[m] for m in range(M) if compressed[m]]
                rest = [p[m] for m in range(M) if not compressed[m]]
                cie += mode(comp) != mode(rest)
            out["cie_rate"] = cie / n
    return out


def enumerate_independent(err):
    """pmf of the number of failures under independence, by enumerating all 2^M outcomes."""
    M = len(err)
    pmf = [0.0] * (M + 1)
    for fails in itertools.product([0, 1], repeat=M):
        pr = 1.0
        for f, e in zip(fails, err):
            pr *= e if f else 1 - e
        pmf[sum(fails)] += pr
    return pmf
