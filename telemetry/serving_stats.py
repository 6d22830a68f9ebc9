"""Serving-side counters a gateway keeps (member latency, member errors, requests by status)
and reports, cumulatively, with every outcome hand-over. The recorder keeps each reporter's
latest report and exposes the sum, so a gateway restart (a new reporter) never lowers a counter.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

__all__ = ["ServingStats", "LATENCY_BUCKETS_S", "merge_reports"]

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServingStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (ecosystem, member, provider) -> [bucket counts..., +Inf], sum
        self.latency: dict[tuple[str, str, str], tuple[list[int], list[float]]] = {}
        self.errors: dict[tuple[str, str, str], int] = {}  # (ecosystem, member, kind)
        self.requests: dict[tuple[str, str], int] = {}  # (ecosystem, code)

    def observe(self, ecosystem: str, member: str, provider: str, seconds: float) -> None:
        with self._lock:
            buckets, total = self.latency.setdefault(
                (ecosystem, member, provider), ([0] * (len(LATENCY_BUCKETS_S) + 1), [0.0])
            )
            buckets[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            total[0] += seconds

    def error(self, ecosystem: str, member: str, kind: str) -> None:
        with self._lock:
            self.errors[(ecosystem, member, kind)] = self.errors.get((ecosystem, member, kind), 0) + 1

    def request(self, ecosystem: str, code: int) -> None:
        key = (ecosystem, str(code))
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "latency": {"|".join(k): (list(b), t[0]) for k, (b, t) in self.latency.items()},
                "errors": {"|".join(k): v for k, v in self.errors.items()},
                "requests": {"|".join(k): v for k, v in self.requests.items()},
            }


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the latest serving reports of every gateway replica."""
    latency: dict[str, tuple[list[int], float]] = {}
    errors: dict[str, int] = {}
    requests: dict[str, int] = {}
    for r in reports:
        for k, (b, t) in r.get("latency", {}).items():
            cur = latency.get(k)
            latency[k] = (b, t) if cur is None else ([x + y for x, y in zip(cur[0], b)], cur[1] + t)
        for k, v in r.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
        for k, v in r.get("requests", {}).items():
            requests[k] = requests.get(k, 0) + v
    return {"latency": latency, "errors": errors, "requests": requests}
