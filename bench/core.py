"""Metric-core benchmark: all ecosystem metrics over 1,000,000 outcomes x 8 members, and the
per-outcome cost of the incremental update, each next to a plain-Python baseline run here."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from brute import metrics  # noqa: E402  (the plain-Python definitions the tests use)

from telemetry import CountsAccumulator, EcosystemCounts, EcosystemShape, correctness, summarize  # noqa: E402


def _data(n: int, m: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    acc = np.linspace(0.7, 0.95, m)
    wrong = (labels[:, None] + rng.integers(1, classes, (n, m))) % classes
    preds = np.where(rng.random((n, m)) < acc, labels[:, None], wrong)
    preds[rng.random((n, m)) < 0.001] = -1
    return preds, labels


def _best(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run() -> list[tuple[str, str, str, str]]:
    n, m, classes = 1_000_000, 8, 10
    preds, labels = _data(n, m, classes)
    shape = EcosystemShape(members=tuple(f"m{i}" for i in range(m)), n_classes=classes, compressed=(False,) * 7 + (True,))

    def vectorised() -> None:
        summarize(EcosystemCounts.from_arrays(shape, preds, correctness(preds, labels)))

    t_vec = _best(vectorised)
    n_py = 20_000  # plain Python is too slow for 1M rows: time a slice and scale linearly
    rows, ys = preds[:n_py].tolist(), labels[:n_py].tolist()
    t_py = _best(lambda: metrics(rows, ys, classes, 0, [False] * 7 + [True]), repeat=1) * (n / n_py)

    n_inc = 50_000
    c = correctness(preds[:n_inc], labels[:n_inc]).tolist()
    prow = preds[:n_inc].tolist()

    def incremental() -> None:
        counts = CountsAccumulator(shape)
        for i in range(n_inc):
            counts.add(prow[i], c[i])

    t_inc = _best(incremental) / n_inc
    # baseline for one outcome: recompute every metric from scratch in plain Python over a
    # 1,000-outcome window (what a naive streaming implementation would do per outcome)
    win_rows, win_y = rows[:1000], ys[:1000]
    t_naive = _best(lambda: metrics(win_rows, win_y, classes, 0, [False] * 7 + [True]), repeat=1)
    return [
        ("all metrics, 1M outcomes x 8 members", f"{t_vec:.3f} s", f"{t_py:.1f} s (plain Python, scaled from 20k)",
         f"{t_py / t_vec:.0f}x faster; target < 1 s: {'met' if t_vec < 1 else 'MISSED'}"),
        ("incremental update, per outcome", f"{t_inc * 1e6:.1f} us", f"{t_naive * 1e6:.0f} us (plain-Python recompute of a 1k window)",
         f"{t_naive / t_inc:.0f}x faster; target < 20 us: {'met' if t_inc < 20e-6 else 'MISSED'}"),
    ]
