"""The recorder's rolling window: additive counts in time buckets, summed on demand."""

from __future__ import annotations

from collections.abc import Callable

from telemetry.counts import EcosystemCounts, EcosystemShape
from telemetry.exploration import ExplorationCounts

__all__ = ["RollingWindow"]


class RollingWindow:
    """Rolling window of additive counts: `n_buckets` buckets of `window_s / n_buckets` seconds."""

    def __init__(self, shape: EcosystemShape, window_s: float, n_buckets: int, clock: Callable[[], float]) -> None:
        self.shape, self.window_s, self.n_buckets = shape, window_s, n_buckets
        self.bucket_s = window_s / n_buckets
        self._clock = clock
        self._buckets: dict[int, tuple[EcosystemCounts, ExplorationCounts]] = {}

    def add(self, counts: EcosystemCounts | None = None, exploration: ExplorationCounts | None = None) -> None:
        idx = int(self._clock() // self.bucket_s)
        c, e = self._buckets.get(idx) or (
            EcosystemCounts(self.shape), ExplorationCounts(self.shape.members, self.shape.n_classes)
        )
        self._buckets[idx] = (c + counts if counts is not None else c, e + exploration if exploration is not None else e)
        self._expire(idx)

    def _expire(self, idx: int) -> None:
        for old in [k for k in self._buckets if k <= idx - self.n_buckets]:
            del self._buckets[old]

    def total(self) -> tuple[EcosystemCounts, ExplorationCounts]:
        self._expire(int(self._clock() // self.bucket_s))
        counts = EcosystemCounts(self.shape)
        exploration = ExplorationCounts(self.shape.members, self.shape.n_classes)
        for c, e in self._buckets.values():
            counts = counts + c
            exploration = exploration + e
        return counts, exploration
