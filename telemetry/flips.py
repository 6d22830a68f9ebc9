"""Candidate versions in shadow: flips, streamed as labels arrive (docs/design.md, "Candidate versions").

A candidate version of a member runs on the member's requests beside the version it serves, is
recorded with the outcome (`Outcome.candidates`), and never serves. When the outcome's first label
arrives, with c the serving version's correctness and c' the candidate's (1, 0; rows where either
is unknown are not counted):

- improvements I = {c = 0, c' = 1}; regressions R = {c = 1, c' = 0} (negative flips);
- negative flip rate = |R| / n; accuracy delta = (|I| - |R|) / n (the candidate's accuracy minus
  the serving version's, on the same outcomes);
- improvements on systemic failures = the improvements where every *other* deployed member is
  wrong too (the deployed ecosystem failed the instance systemically); their share of |I|.

Counts are additive (`add`, `+`), per (member, serving version, candidate version) and per
declared subgroup and intersection ("all" for every outcome), so a restarted recorder rebuilds them
from the store. Label-free, at record time: outcomes on which the candidate ran, and on which it
gave the serving version's answer (`recorded`, `agreed`).

Pipeline members (chains of stages): a candidate version of a pipeline that runs another version of
a stage is compared twice on the same outcomes: end to end, as any candidate (key (member, serving
version, candidate version)), and the stage alone, where the stage predicts the ecosystem's classes
itself (key ("member.stage", serving stage version, candidate stage version); its correctness is
its own class against the label). The two keys are linked (`links`). A **self-defeating
improvement** is a link whose stage is better on its own (accuracy delta's lower bound > 0) while
the chain is worse end to end (the member's delta's upper bound < 0), both over every outcome
("all"): `self_defeating`.

Intervals: Wilson for the two ratios; for the delta, the normal interval of a paired difference of
proportions, var = (|I| + |R| - (|I| - |R|)^2 / n) / n^2 (the variance McNemar's test uses).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from telemetry.counts import OTHER, EcosystemShape, group_keys
from telemetry.estimation import wilson

__all__ = ["CandidateFlips", "FlipKey", "FIELDS", "delta_interval"]

FlipKey = tuple[str, str, str]  # (member, serving version, candidate version)
FIELDS = ("n", "current_correct", "candidate_correct", "improvements", "regressions", "improvements_on_systemic")
_N, _CUR, _CAND, _IMP, _REG, _IMP_SYS = range(len(FIELDS))
Z95 = 1.959963984540054


def delta_interval(improvements: int, regressions: int, n: int, z: float = Z95) -> tuple[float, float, float] | None:
    """(delta, lower, upper) of the paired accuracy difference; None without outcomes."""
    if n <= 0:
        return None
    d = (improvements - regressions) / n
    var = max(0.0, (improvements + regressions) - (improvements - regressions) ** 2 / n) / n**2
    h = z * math.sqrt(var)
    return d, max(-1.0, d - h), min(1.0, d + h)


class CandidateFlips:
    """Additive flip counts: key -> (subgroup, subgroup value) -> int64[len(FIELDS)]; and
    label-free counts: key -> [recorded, agreed]."""

    def __init__(self, shape: EcosystemShape) -> None:
        self.shape = shape
        self.tallies: dict[FlipKey, dict[tuple[str, str], np.ndarray]] = {}
        self.recorded: dict[FlipKey, np.ndarray] = {}
        # (a pipeline member's key, the key of one of its stages whose version the candidate changes)
        self.links: set[tuple[FlipKey, FlipKey]] = set()

    def __add__(self, other: CandidateFlips) -> CandidateFlips:
        out = CandidateFlips(self.shape)
        for src in (self, other):
            for key, groups in src.tallies.items():
                mine = out.tallies.setdefault(key, {})
                for g, v in groups.items():
                    mine[g] = mine[g] + v if g in mine else v.copy()
            for key, v in src.recorded.items():
                out.recorded[key] = out.recorded[key] + v if key in out.recorded else v.copy()
            out.links |= src.links
        return out

    # ------------------------------------------------------------ counting
    def count_recorded(self, keys: Sequence[FlipKey], cand: np.ndarray, cur: np.ndarray) -> None:
        """Label-free: one row per (outcome, candidate) that ran: its key, the candidate's output
        code and the serving version's (-1: missing)."""
        for key in set(keys):
            sel = np.array([k == key for k in keys])
            both = sel & (cand >= 0) & (cur >= 0)
            add = np.array([int(sel.sum()), int((both & (cand == cur)).sum())], dtype=np.int64)
            self.recorded[key] = self.recorded[key] + add if key in self.recorded else add

    def count_labeled(self, keys: Sequence[FlipKey], member_index: np.ndarray, correct: np.ndarray,
                      cand_correct: np.ndarray, groups: dict[str, list[str]] | None) -> None:
        """One row per labeled (outcome, candidate): `correct` (N, M) the deployed members'
        correctness on the outcome, `member_index` the member the candidate shadows,
        `cand_correct` (N,) the candidate's (1, 0, -1 unknown)."""
        n = len(keys)
        if not n:
            return
        rows = np.arange(n)
        cur = correct[rows, member_index]
        known = (cur >= 0) & (cand_correct >= 0)
        others = correct.copy()
        others[rows, member_index] = 0  # "every other member wrong": the shadowed member's own column ignored
        others_known = (correct >= 0).all(axis=1)
        systemic_others = others_known & (others == 0).all(axis=1)
        imp = known & (cur == 0) & (cand_correct == 1)
        table = np.stack([known, known & (cur == 1), known & (cand_correct == 1), imp,
                          known & (cur == 1) & (cand_correct == 0), imp & systemic_others], axis=1).astype(np.int64)
        labels = self._group_labels(groups, n)
        for key in set(keys):
            sel = np.array([k == key for k in keys])
            mine = self.tallies.setdefault(key, {})
            for g, col in labels:
                if col is None:
                    self._bump(mine, g, table[sel].sum(axis=0))
                    continue
                for value in np.unique(col[sel]):
                    self._bump(mine, (g[0], str(value)), table[sel & (col == value)].sum(axis=0))

    @staticmethod
    def _bump(mine: dict[tuple[str, str], np.ndarray], g: tuple[str, str], add: np.ndarray) -> None:
        mine[g] = mine[g] + add if g in mine else add.astype(np.int64)

    def _group_labels(self, groups: dict[str, list[str]] | None, n: int) -> list[tuple[tuple[str, str], Any]]:
        out: list[tuple[tuple[str, str], Any]] = [(("all", "all"), None)]
        if not groups:
            return out
        for key, attrs in group_keys(self.shape):
            cols = []
            for attr in attrs:
                col = np.asarray(groups[attr]).astype(str)
                allowed = np.asarray(list(self.shape.subgroups[attr]), dtype=str)
                cols.append(np.where(np.isin(col, allowed), col, OTHER))
            joined = cols[0]
            for extra in cols[1:]:
                joined = np.char.add(np.char.add(joined, "&"), extra)
            out.append(((key, ""), joined))
        return out

    # ------------------------------------------------------------ reading
    def rows(self) -> Iterator[tuple[FlipKey, str, str, dict[str, int]]]:
        """(key, subgroup, subgroup value, counts by FIELDS name), every tally."""
        for key, groups in sorted(self.tallies.items()):
            for (g, v), arr in sorted(groups.items()):
                yield key, g, v, dict(zip(FIELDS, (int(x) for x in arr)))

    def self_defeating(self) -> Iterator[tuple[FlipKey, str, bool, tuple[float, float, float] | None,
                                               tuple[float, float, float] | None]]:
        """Per link: (member key, stage name, flagged, the stage's accuracy delta, the chain's), the
        deltas as (value, lower, upper) over every outcome, None before a labeled one."""
        for member_key, stage_key in sorted(self.links):
            deltas = []
            for key in (stage_key, member_key):
                arr = self.tallies.get(key, {}).get(("all", "all"))
                c = dict(zip(FIELDS, (int(x) for x in arr))) if arr is not None else None
                deltas.append(delta_interval(c["improvements"], c["regressions"], c["n"]) if c else None)
            stage, chain = deltas
            flagged = stage is not None and chain is not None and stage[1] > 0 and chain[2] < 0
            yield member_key, stage_key[0].partition(".")[2], flagged, stage, chain

    @staticmethod
    def ratios(c: dict[str, int]) -> dict[str, tuple[float, float, float] | None]:
        """negative flip rate, accuracy delta, share of improvements on systemic failures: each
        (value, lower, upper), None without a denominator."""
        n, imp = c["n"], c["improvements"]
        nfr = None
        if n:
            lo, hi = wilson(c["regressions"], n)
            nfr = (c["regressions"] / n, float(lo), float(hi))
        share = None
        if imp:
            lo, hi = wilson(c["improvements_on_systemic"], imp)
            share = (c["improvements_on_systemic"] / imp, float(lo), float(hi))
        return {"negative_flip": nfr, "accuracy_delta": delta_interval(imp, c["regressions"], n),
                "improvements_on_systemic_failures": share}
