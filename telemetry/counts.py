"""Additive ecosystem counts: the one state every ecosystem metric is derived from.

Counts are sums, so shards add up (`a + b`) and PromQL can take any window over
them. They come from two paths that must agree exactly:

- `EcosystemCounts.from_arrays(...)`: vectorised (numpy) over a batch of outcomes;
- `CountsAccumulator.add(...)` (telemetry.accumulator): one outcome at a time (the
  streaming path), snapshotted into `EcosystemCounts` when read.

Conventions (docs/design.md, "Metric definitions"):

- predictions are class ids `>= 0`; `-1` marks a missing output (error, timeout);
- correctness is `1`/`0`, and `-1` where unknown: a missing output, an unlabeled
  outcome, or in bandit mode a member whose output differs from the served one;
- a member's accuracy counts the outcomes where its correctness is known;
- cross-member label metrics (failures per instance, systemic failure, consistent
  success, the baseline's error rates) use only *complete* outcomes, where every
  member's correctness is known; the others are counted as incomplete, never as
  failures;
- label-free metrics (agreement, kappa, unanimity, ambiguity, discrepancy, CIE)
  use the outcomes where every member produced an output.

Knows nothing of Ray, HTTP or storage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["EcosystemShape", "EcosystemCounts", "correctness", "cie_mask", "value_bins", "value_correctness", "OTHER", "MISSING", "group_keys"]

OTHER = "other"
MISSING = -1


@dataclass(frozen=True)
class EcosystemShape:
    """What the counts are counted over: fixed for the life of a `EcosystemCounts`."""

    members: tuple[str, ...]
    n_classes: int
    reference: int = 0  # index of the served/primary member (multiplicity reference)
    compressed: tuple[bool, ...] = ()  # per member; empty = none compressed
    subgroups: Mapping[str, Sequence[str]] = field(default_factory=dict)
    intersections: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise ValueError(f"an ecosystem needs at least 2 members, got {len(self.members)}")
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"member names must be distinct, got {list(self.members)}")
        if self.n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {self.n_classes}")
        if not 0 <= self.reference < len(self.members):
            raise ValueError(f"reference index {self.reference} out of range for {len(self.members)} members")
        if self.compressed and len(self.compressed) != len(self.members):
            raise ValueError("compressed needs one flag per member")

    @property
    def m(self) -> int:
        return len(self.members)

    @property
    def has_cie(self) -> bool:
        return bool(self.compressed) and any(self.compressed) and not all(self.compressed)


def value_bins(values: np.ndarray, low: float, width: float, n_bins: int) -> np.ndarray:
    """Regression values -> agreement bins (int64): bins of `width` from `low`, values beyond the
    range in the first or last bin, -1 where a value is missing (NaN). What every label-free
    metric of a regression ecosystem compares (models.manifest.RegressionSpec)."""
    missing = np.isnan(values)
    bins = np.clip(np.floor((np.where(missing, low, values) - low) / width), 0, n_bins - 1).astype(np.int64)
    bins[missing] = MISSING
    return bins


def value_correctness(values: np.ndarray, labels: np.ndarray, tolerance: float) -> np.ndarray:
    """Correctness (N, M) in {1, 0, -1} of regression values against true values (N,): correct
    when |value - label| <= tolerance; -1 where the value or the label is missing (NaN)."""
    with np.errstate(invalid="ignore"):
        c: np.ndarray = (np.abs(values - labels[:, None]) <= tolerance).astype(np.int8)
    c[np.isnan(values) | np.isnan(labels)[:, None]] = -1
    return c


def group_keys(shape: EcosystemShape) -> list[tuple[str, tuple[str, ...]]]:
    """(group key, attributes) for every declared attribute and intersection, e.g. ('sex&age_group', ...)."""
    keys: list[tuple[str, tuple[str, ...]]] = [(attr, (attr,)) for attr in shape.subgroups]
    keys += [("&".join(combo), combo) for combo in shape.intersections]
    return keys


def correctness(
    preds: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    served: np.ndarray | None = None,
    rewards: np.ndarray | None = None,
) -> np.ndarray:
    """Correctness matrix (N, M) of int8: 1, 0, or -1 (unknown).

    Ground-truth mode: pass `labels` (class ids, -1 = no label).
    Bandit mode: pass `served` (member index per row) and `rewards`; a member's
    correctness is known only where its output equals the served output, and a
    positive reward counts as success (NaN reward = no label).
    """
    preds = np.asarray(preds)
    if labels is not None:
        labels = np.asarray(labels)
        c: np.ndarray = (preds == labels[:, None]).astype(np.int8)
        c[(preds < 0) | (labels < 0)[:, None]] = -1
        return c
    if served is None or rewards is None:
        raise ValueError("pass labels (ground_truth mode) or served and rewards (bandit mode)")
    rows = np.arange(preds.shape[0])
    served_out = preds[rows, served]
    rewards = np.asarray(rewards, dtype=np.float64)
    success = (rewards > 0).astype(np.int8)
    c = np.where(preds == served_out[:, None], success[:, None], np.int8(-1)).astype(np.int8)
    c[(preds < 0) | np.isnan(rewards)[:, None] | (served_out < 0)[:, None]] = -1
    return c


@dataclass
class EcosystemCounts:
    """Additive counts for one ecosystem (and, nested, for each subgroup value)."""

    shape: EcosystemShape
    # label part
    n_labeled: int = 0  # outcomes with at least one known correctness
    n_complete: int = 0  # outcomes with every member's correctness known
    member_n: np.ndarray = field(default=None)  # type: ignore[arg-type]
    member_correct: np.ndarray = field(default=None)  # type: ignore[arg-type]
    complete_correct: np.ndarray = field(default=None)  # type: ignore[arg-type]
    k_hist: np.ndarray = field(default=None)  # type: ignore[arg-type]
    # label-free part
    n_outcomes: int = 0
    n_predicted: int = 0  # outcomes where every member produced an output
    agree: np.ndarray = field(default=None)  # type: ignore[arg-type]  # (M, M), symmetric, diag = n_predicted
    class_counts: np.ndarray = field(default=None)  # type: ignore[arg-type]  # (M, C) on predicted outcomes
    unanimous: int = 0
    disagree_patterns: dict[int, int] = field(default_factory=dict)  # bitmask of members != reference -> count
    cie: int = 0
    groups: dict[str, dict[str, EcosystemCounts]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m, c = self.shape.m, self.shape.n_classes
        if self.member_n is None:
            self.member_n = np.zeros(m, dtype=np.int64)
            self.member_correct = np.zeros(m, dtype=np.int64)
            self.complete_correct = np.zeros(m, dtype=np.int64)
            self.k_hist = np.zeros(m + 1, dtype=np.int64)
            self.agree = np.zeros((m, m), dtype=np.int64)
            self.class_counts = np.zeros((m, c), dtype=np.int64)

    # ------------------------------------------------------------------ batch
    @classmethod
    def from_arrays(
        cls,
        shape: EcosystemShape,
        preds: np.ndarray,
        correct: np.ndarray | None = None,
        groups: Mapping[str, Sequence[object] | np.ndarray] | None = None,
        *,
        labels_only: bool = False,
        _nested: bool = False,
    ) -> EcosystemCounts:
        """Counts over N outcomes: preds (N, M) class ids (-1 missing), correct (N, M) in {1, 0, -1}.

        `labels_only=True` counts the label part alone (the label-free part and `n_outcomes` stay
        0): what the streaming recorder adds when labels arrive, since it counted the outcomes'
        predictions when they were recorded (adding both would count them twice)."""
        preds = np.asarray(preds, dtype=np.int64)
        n, m = preds.shape if preds.ndim == 2 else (0, 0)
        if preds.ndim != 2 or m != shape.m:
            raise ValueError(f"preds must have shape (N, {shape.m}), got {preds.shape}")
        if preds.size and preds.max() >= shape.n_classes:
            raise ValueError(f"class id {int(preds.max())} out of range for {shape.n_classes} classes")
        out = cls(shape)
        out.n_outcomes = 0 if labels_only else n
        if correct is not None:
            correct = np.asarray(correct, dtype=np.int8)
            if correct.shape != preds.shape:
                raise ValueError(f"correct must have shape {preds.shape}, got {correct.shape}")
            known = correct >= 0
            ok = correct == 1
            any_known = known.any(axis=1)
            complete = known.all(axis=1)
            out.n_labeled = int(any_known.sum())
            out.n_complete = int(complete.sum())
            out.member_n = known.sum(axis=0).astype(np.int64)
            out.member_correct = ok.sum(axis=0).astype(np.int64)
            cc = ok[complete]
            out.complete_correct = cc.sum(axis=0).astype(np.int64)
            k = m - cc.sum(axis=1)
            out.k_hist = np.bincount(k, minlength=m + 1).astype(np.int64)
        if not labels_only:  # the label-free part
            out._count_predicted(preds)
        if groups and not _nested:
            for key, attrs in group_keys(shape):
                cols = []
                for attr in attrs:
                    if attr not in groups:
                        raise ValueError(f"group column {attr!r} missing")
                    col = np.asarray(groups[attr]).astype(str)
                    if col.shape != (n,):
                        raise ValueError(f"group column {attr!r} must have {n} values, got shape {col.shape}")
                    allowed = np.asarray(list(shape.subgroups[attr]), dtype=str)
                    cols.append(np.where(np.isin(col, allowed), col, OTHER))
                joined = cols[0] if len(cols) == 1 else np.char.add(np.char.add(cols[0], "&"), cols[1])
                for extra in cols[2:]:
                    joined = np.char.add(np.char.add(joined, "&"), extra)
                sub: dict[str, EcosystemCounts] = {}
                for value in np.unique(joined):
                    sel = joined == value
                    sub[str(value)] = cls.from_arrays(
                        shape, preds[sel], None if correct is None else correct[sel], labels_only=labels_only,
                        _nested=True,
                    )
                out.groups[key] = sub
        return out

    def _count_predicted(self, preds: np.ndarray) -> None:
        """The label-free part: agreement, class counts, unanimity, disagreement patterns, CIE."""
        m = self.shape.m
        predicted = (preds >= 0).all(axis=1)
        p = preds[predicted]
        self.n_predicted = int(p.shape[0])
        for a in range(m):
            self.class_counts[a] = np.bincount(p[:, a], minlength=self.shape.n_classes)
            self.agree[a, a] = self.n_predicted
            for b in range(a + 1, m):
                same = int(np.count_nonzero(p[:, a] == p[:, b]))
                self.agree[a, b] = self.agree[b, a] = same
        if self.n_predicted:
            self.unanimous = int(np.count_nonzero((p == p[:, :1]).all(axis=1)))
            ref_col = p[:, self.shape.reference]
            bits = np.zeros(self.n_predicted, dtype=np.int64)
            for a in range(m):
                bits |= (p[:, a] != ref_col).astype(np.int64) << a
            values, counts = np.unique(bits, return_counts=True)
            self.disagree_patterns = {int(v): int(c) for v, c in zip(values, counts)}
            if self.shape.has_cie:
                self.cie = int(np.count_nonzero(cie_mask(p, self.shape)))

    # -------------------------------------------------------------- algebra
    def __add__(self, other: EcosystemCounts) -> EcosystemCounts:
        if other.shape != self.shape:
            raise ValueError("cannot add counts of different ecosystem shapes")
        out = EcosystemCounts(self.shape)
        for name in ("n_labeled", "n_complete", "n_outcomes", "n_predicted", "unanimous", "cie"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for name in ("member_n", "member_correct", "complete_correct", "k_hist", "agree", "class_counts"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        pats = dict(self.disagree_patterns)
        for k, v in other.disagree_patterns.items():
            pats[k] = pats.get(k, 0) + v
        out.disagree_patterns = pats
        for key in set(self.groups) | set(other.groups):
            mine, theirs = self.groups.get(key, {}), other.groups.get(key, {})
            merged: dict[str, EcosystemCounts] = {}
            for value in set(mine) | set(theirs):
                if value in mine and value in theirs:
                    merged[value] = mine[value] + theirs[value]
                else:
                    merged[value] = mine.get(value) or theirs[value]
            out.groups[key] = merged
        return out

    def __neg__(self) -> EcosystemCounts:
        """Every count negated: `a + (-b)` takes b's outcomes out of a (an outcome re-counted)."""
        out = EcosystemCounts(self.shape)
        for name in ("n_labeled", "n_complete", "n_outcomes", "n_predicted", "unanimous", "cie"):
            setattr(out, name, -getattr(self, name))
        for name in ("member_n", "member_correct", "complete_correct", "k_hist", "agree", "class_counts"):
            setattr(out, name, -getattr(self, name))
        out.disagree_patterns = {k: -v for k, v in self.disagree_patterns.items()}
        out.groups = {key: {value: -c for value, c in by.items()} for key, by in self.groups.items()}
        return out

    def equals(self, other: EcosystemCounts) -> bool:
        """Exact equality of every count, nested groups included (zero-count patterns ignored)."""
        scalars = ("n_labeled", "n_complete", "n_outcomes", "n_predicted", "unanimous", "cie")
        arrays = ("member_n", "member_correct", "complete_correct", "k_hist", "agree", "class_counts")
        if any(getattr(self, s) != getattr(other, s) for s in scalars):
            return False
        if any(not np.array_equal(getattr(self, a), getattr(other, a)) for a in arrays):
            return False
        if {k: v for k, v in self.disagree_patterns.items() if v} != {
            k: v for k, v in other.disagree_patterns.items() if v
        }:
            return False
        mine = {k: v for k, v in self.groups.items() if v}
        theirs = {k: v for k, v in other.groups.items() if v}
        if set(mine) != set(theirs):
            return False
        for key, sub in mine.items():
            if set(sub) != set(other.groups[key]):
                return False
            if not all(sub[v].equals(other.groups[key][v]) for v in sub):
                return False
        return True


def _modal(preds: np.ndarray, cols: np.ndarray, n_classes: int) -> np.ndarray:
    """Modal class per row over the given member columns; ties go to the smallest class id."""
    if len(cols) == 1:
        return preds[:, cols[0]]
    votes = np.zeros((preds.shape[0], n_classes), dtype=np.int16)
    rows = np.arange(preds.shape[0])
    for col in cols:
        # within one column each row appears once, so plain fancy-index += is exact (no np.add.at needed)
        votes[rows, preds[:, col]] += 1
    modal: np.ndarray = votes.argmax(axis=1)
    return modal


def cie_mask(preds: np.ndarray, shape: EcosystemShape) -> np.ndarray:
    """Compression-identified exemplars (Hooker et al. 2019): modal prediction of the
    compressed members differs from the modal prediction of the uncompressed ones."""
    flags = np.asarray(shape.compressed, dtype=bool)
    comp, full = np.flatnonzero(flags), np.flatnonzero(~flags)
    mask: np.ndarray = _modal(preds, comp, shape.n_classes) != _modal(preds, full, shape.n_classes)
    return mask
