"""Version change of one member: flips, and whether improvements land on systemic failures.

Both versions run on the same labeled instances (e.g. the new version shadowed
during a rollout). With correctness c_v, c_v' of the old and new version:
improvements I = {c_v = 0, c_v' = 1}, regressions R = {c_v = 1, c_v' = 0};
negative flip rate = |R| / N; improvement on systemic failures =
|{i in I : every other member fails on i}| / |I| (Bommasani et al. 2023 found ~10%
on average). Rows where any needed correctness is unknown (-1) are excluded and
counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["VersionChangeCounts"]


@dataclass
class VersionChangeCounts:
    n: int = 0
    excluded: int = 0
    improvements: int = 0
    regressions: int = 0
    improvements_on_systemic: int = 0

    @classmethod
    def from_arrays(cls, old: np.ndarray, new: np.ndarray, others: np.ndarray) -> VersionChangeCounts:
        """old, new: (N,) correctness of the two versions; others: (N, K) of the other members."""
        old, new = np.asarray(old), np.asarray(new)
        others = np.asarray(others)
        if others.ndim == 1:
            others = others[:, None]
        known = (old >= 0) & (new >= 0) & (others >= 0).all(axis=1)
        o, w, rest = old[known], new[known], others[known]
        imp = (o == 0) & (w == 1)
        all_others_fail = (rest == 0).all(axis=1)
        return cls(
            n=int(known.sum()),
            excluded=int((~known).sum()),
            improvements=int(imp.sum()),
            regressions=int(((o == 1) & (w == 0)).sum()),
            improvements_on_systemic=int((imp & all_others_fail).sum()),
        )

    def add(self, old: int, new: int, others: list[int]) -> None:
        if old < 0 or new < 0 or any(v < 0 for v in others):
            self.excluded += 1
            return
        self.n += 1
        if old == 0 and new == 1:
            self.improvements += 1
            if all(v == 0 for v in others):
                self.improvements_on_systemic += 1
        elif old == 1 and new == 0:
            self.regressions += 1

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "excluded": self.excluded,
            "improvements": self.improvements,
            "regressions": self.regressions,
            "positive_flip_rate": self.improvements / self.n if self.n else None,
            "negative_flip_rate": self.regressions / self.n if self.n else None,
            "improvement_on_systemic_failures": (
                self.improvements_on_systemic / self.improvements if self.improvements else None
            ),
        }
