"""Hostile request bodies: valid inference, feedback and outcome bodies with one position (at any
depth) replaced by a hostile value, sometimes truncated or made invalid UTF-8. Used by the test
suite against the in-process app (tests/test_hostile_input.py) and by `python -m bench
reliability` against the live server."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

__all__ = ["VALUES", "BASES", "mutated_bodies"]

VALUES: list[Any] = [None, True, False, 0, -1, 1e308, -1e308, 5e-324, 1.5, float("nan"), float("inf"), "", "x",
                     "\x00", "\ud800", [], {}, [[[[[]]]]], {"a": {"b": {"c": {}}}}, "9" * 400, 2**70, -(2**70),
                     [1] * 3, {"name": "input"}, "good", "digits"]
BASES = {
    "/v2/models/digits/infer": {
        "id": "f", "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [[0.0] * 64] * 2,
                               "parameters": {}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": False}}],
        "parameters": {"request_ids": ["a", "b"], "sex": "f"},
    },
    "/v2/feedback": {"labels": [{"request_id": "a", "label": 1, "timestamp": 1.0, "source": "s"}]},
    "/v2/outcomes": {"outcomes": [{"request_id": "o", "ecosystem": "credit", "outputs": {"knn": 1}, "served": "knn",
                                   "propensity": 0.5, "subgroups": {"sex": "female"}, "timestamp": 1.0}]},
}


def _mutate(obj: Any, rng: random.Random) -> Any:
    """`obj` with one position (at any depth) replaced by a hostile value."""
    if isinstance(obj, dict) and obj and rng.random() < 0.7:
        key = rng.choice(list(obj))
        return {**obj, key: _mutate(obj[key], rng) if rng.random() < 0.6 else rng.choice(VALUES)}
    if isinstance(obj, list) and obj and rng.random() < 0.7:
        i = rng.randrange(len(obj))
        return obj[:i] + [_mutate(obj[i], rng) if rng.random() < 0.6 else rng.choice(VALUES)] + obj[i + 1:]
    return rng.choice(VALUES)


def mutated_bodies(rng: random.Random, n: int, bases: dict[str, Any] = BASES) -> Iterator[tuple[str, bytes]]:
    """`n` (path, raw body) pairs: 1-3 mutations of a base body, 10% truncated, 5% not UTF-8."""
    for _ in range(n):
        path = rng.choice(list(bases))
        body = bases[path]
        for _ in range(1 + rng.randrange(3)):
            body = _mutate(body, rng)
        raw = json.dumps(body, allow_nan=True).encode()
        if rng.random() < 0.1:
            raw = raw[: rng.randrange(len(raw))]  # truncated
        if rng.random() < 0.05:
            raw = raw.replace(b"a", b"\xff", 1)  # not UTF-8
        yield path, raw
