"""The streaming form of the counts: fold one outcome at a time, read a snapshot.

`CountsAccumulator.add` is on the recorder's hot path, so it works on plain
Python ints and lists (a numpy scalar increment costs several times a list's);
`snapshot()` turns the state into an `EcosystemCounts` equal to what
`EcosystemCounts.from_arrays` gives for the same outcomes (the tests hold both
paths to that). Subgroup values that the shape does not declare count as `other`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from telemetry.counts import OTHER, EcosystemCounts, EcosystemShape, group_keys

__all__ = ["CountsAccumulator", "bounded_group_value"]


def bounded_group_value(shape: EcosystemShape, attrs: Sequence[str], groups: Mapping[str, object]) -> str:
    """The label value of an attribute (or intersection): undeclared values become `other`."""
    parts = []
    for attr in attrs:
        v = groups.get(attr)
        sv = str(v) if v is not None else ""
        parts.append(sv if sv in shape.subgroups.get(attr, ()) else OTHER)
    return "&".join(parts)


def _modal(values: list[int]) -> int:
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)  # ties: smallest class id, as in cie_mask


class CountsAccumulator:
    """Mutable, fast, one-outcome-at-a-time counts for one ecosystem (and its subgroups)."""

    __slots__ = (
        "shape", "_m", "_pairs", "_comp", "_full", "n_outcomes", "n_labeled", "n_complete", "member_n",
        "member_correct", "complete_correct", "k_hist", "n_predicted", "agree", "class_counts", "unanimous",
        "patterns", "cie", "groups",
    )

    def __init__(self, shape: EcosystemShape) -> None:
        m = shape.m
        self.shape = shape
        self._m = m
        self._pairs = [(a, b) for a in range(m) for b in range(a + 1, m)]
        self._comp = [a for a in range(m) if shape.compressed and shape.compressed[a]]
        self._full = [a for a in range(m) if not (shape.compressed and shape.compressed[a])]
        self.n_outcomes = self.n_labeled = self.n_complete = self.n_predicted = 0
        self.unanimous = self.cie = 0
        self.member_n = [0] * m
        self.member_correct = [0] * m
        self.complete_correct = [0] * m
        self.k_hist = [0] * (m + 1)
        self.agree = [0] * len(self._pairs)
        self.class_counts = [[0] * shape.n_classes for _ in range(m)]
        self.patterns: dict[int, int] = {}
        self.groups: dict[str, dict[str, CountsAccumulator]] = {}

    def add(
        self,
        preds: Sequence[int],
        correct: Sequence[int] | None = None,
        groups: Mapping[str, object] | None = None,
        *,
        count_predictions: bool = True,
    ) -> None:
        """Fold one outcome in: preds (M,) class ids (-1 missing), correct (M,) in {1, 0, -1} or None.

        `count_predictions=False` folds only the label part: the streaming recorder counts an
        outcome's predictions when it is recorded and its label when the label arrives.
        """
        m = self._m
        p = preds if isinstance(preds, list) else [int(v) for v in preds]
        if len(p) != m:
            raise ValueError(f"expected {m} predictions, got {len(p)}")
        c = None
        if correct is not None:
            c = correct if isinstance(correct, list) else [int(v) for v in correct]
            if len(c) != m:
                raise ValueError(f"expected {m} correctness values, got {len(c)}")
        predicted = min(p) >= 0
        if predicted and max(p) >= self.shape.n_classes:
            raise ValueError(f"class id {max(p)} out of range for {self.shape.n_classes} classes")
        self._fold(p, c, predicted and count_predictions, count_predictions)
        if groups is not None and self.shape.subgroups:
            for key, attrs in group_keys(self.shape):
                value = bounded_group_value(self.shape, attrs, groups)
                sub = self.groups.setdefault(key, {})
                acc = sub.get(value)
                if acc is None:
                    acc = sub[value] = CountsAccumulator(self.shape)
                acc._fold(p, c, predicted and count_predictions, count_predictions)

    def _fold(self, p: list[int], c: list[int] | None, predicted: bool, count_outcome: bool = True) -> None:
        if count_outcome:
            self.n_outcomes += 1
        if c is not None:
            unknown = c.count(-1)
            if unknown < self._m:
                self.n_labeled += 1
                mn, mc = self.member_n, self.member_correct
                for a, v in enumerate(c):
                    if v >= 0:
                        mn[a] += 1
                        if v == 1:
                            mc[a] += 1
                if unknown == 0:
                    self.n_complete += 1
                    ok = c.count(1)
                    self.k_hist[self._m - ok] += 1
                    cc = self.complete_correct
                    for a, v in enumerate(c):
                        if v == 1:
                            cc[a] += 1
        if not predicted:
            return
        self.n_predicted += 1
        for a, v in enumerate(p):
            self.class_counts[a][v] += 1
        agree = self.agree
        for i, (a, b) in enumerate(self._pairs):
            if p[a] == p[b]:
                agree[i] += 1
        ref = p[self.shape.reference]
        bits = 0
        for a, v in enumerate(p):
            if v != ref:
                bits |= 1 << a
        if bits == 0:  # every member agrees with the reference: unanimous
            self.unanimous += 1
        self.patterns[bits] = self.patterns.get(bits, 0) + 1
        if (self._comp and self._full and bits
                and _modal([p[a] for a in self._comp]) != _modal([p[a] for a in self._full])):
            self.cie += 1

    def snapshot(self) -> EcosystemCounts:
        """The state as `EcosystemCounts` (arrays), equal to the batch form of the same outcomes."""
        m = self._m
        out = EcosystemCounts(self.shape)
        out.n_outcomes, out.n_labeled, out.n_complete = self.n_outcomes, self.n_labeled, self.n_complete
        out.n_predicted, out.unanimous, out.cie = self.n_predicted, self.unanimous, self.cie
        out.member_n = np.array(self.member_n, dtype=np.int64)
        out.member_correct = np.array(self.member_correct, dtype=np.int64)
        out.complete_correct = np.array(self.complete_correct, dtype=np.int64)
        out.k_hist = np.array(self.k_hist, dtype=np.int64)
        agree = np.zeros((m, m), dtype=np.int64)
        for i, (a, b) in enumerate(self._pairs):
            agree[a, b] = agree[b, a] = self.agree[i]
        np.fill_diagonal(agree, self.n_predicted)
        out.agree = agree
        out.class_counts = np.array(self.class_counts, dtype=np.int64).reshape(m, self.shape.n_classes)
        out.disagree_patterns = dict(self.patterns)
        out.groups = {key: {v: acc.snapshot() for v, acc in sub.items()} for key, sub in self.groups.items()}
        return out
