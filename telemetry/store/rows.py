"""Stored outcomes as the recorder reads them back, decoded in batches; the chunking of batches
into statements of a few fixed sizes."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

__all__ = ["StoredOutcome", "FirstLabel", "COLUMNS", "decode_rows", "chunks", "sized_chunks", "CHUNK"]

CHUNK = 500  # ids per IN (...) query: well under SQLite's variable limit


class StoredOutcome(NamedTuple):
    """One stored outcome as the recorder reads it back (a named tuple: built thousands of times per
    feedback batch, ~10x cheaper than a frozen dataclass). Its propensity list and group dict may
    be shared between outcomes (decoding is cached): read them, never change them."""

    request_id: str
    ecosystem: str
    created_at: float
    predictions: list[int] | list[float | None]  # class ids; a regression ecosystem's values
    served: int
    intended: int
    greedy: int
    propensities: list[float]
    direct: bool
    groups: dict[str, str]
    label: float | None
    label_source: str | None
    counted_label: float | None
    counted_source: str | None
    counted_time: float | None
    members: tuple[str, ...] = ()  # the member list it was recorded with (its context); indices refer to it
    scores: list[float | None] | None = None  # per member, its score for its predicted class (None: none)
    score_vectors: list[list[float | None] | None] | None = None  # per member, every class's score (if recorded)
    # candidate versions run in shadow: [member index, serving version, candidate version, output, score]
    candidates: list[list[Any]] | None = None
    # pipeline members' stages: [member index, role (0 serving, 1 candidate), stage, version, fingerprint,
    # class, score]
    stages: list[list[Any]] | None = None
    rankings: list[list[int] | None] | None = None  # ranking: each member's top-k item ids
    # ranking: [item ids shown in slot order, their slot propensities, their ranks in the served list, shuffled]
    shown: list[Any] | None = None


# a first label, as the recorder hands it to `apply_labels` (a plain tuple: one per label, thousands
# per feedback request): (request_id, ecosystem, label, source, label_time, received_at, origin)
FirstLabel = tuple[str, str, float, str, float, float, str]

COLUMNS = ("request_id", "ecosystem", "created_at", "payload", "propensities", "groups", "label", "label_source",
            "counted_label", "counted_source", "counted_time", "context")


def decode_rows(rows: Sequence[Sequence[Any]], members: dict[int, tuple[str, ...]]) -> list[StoredOutcome]:
    """Rows in `COLUMNS` order -> outcomes; `members`: context id -> its member list. The payloads
    are decoded with one `json.loads` per batch (per-row calls were a third of the label-ingest
    time); propensity vectors and group objects, which repeat from row to row (one per policy
    decision kind, per subgroup), once per distinct text (`_DECODED`)."""
    if not rows:
        return []
    payloads = json.loads("[" + ",".join(r[3] for r in rows) + "]")
    if len(_DECODED) > 4096:
        _DECODED.clear()
    for r in rows:  # decode each distinct propensity and group text once, up front
        if r[4] not in _DECODED:
            _DECODED[r[4]] = json.loads(r[4])
        if r[5] not in _DECODED:
            _DECODED[r[5]] = json.loads(r[5])
    new, dec = tuple.__new__, _DECODED  # tuple.__new__ direct: the named tuple's own __new__ is a Python call
    return [
        new(StoredOutcome, (r[0], r[1], r[2], p[0], p[1], p[2], p[3], dec[r[4]], bool(p[4]), dec[r[5]],
                            r[6], r[7], r[8], r[9], r[10], members[r[11]], p[6] if len(p) > 6 else None,
                            p[7] if len(p) > 7 else None, p[8] if len(p) > 8 else None,
                            p[9] if len(p) > 9 else None, p[10] if len(p) > 10 else None,
                            p[11] if len(p) > 11 else None))
        for r, p in zip(rows, payloads)
    ]


_DECODED: dict[str, Any] = {}  # JSON text -> its (shared, never changed) value; bounded


def chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


def sized_chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """Chunks of `CHUNK` items, then the rest in powers of two (at most 9 more): a multi-row
    statement is compiled once per size, and compiling one cost about as much as running it here
    (~5 us per row), so the sizes come from a fixed set of 10 that stay in the statement caches
    (SQLite's per connection, psycopg's prepared statements) instead of one new size per batch."""
    i, n = 0, len(items)
    while n - i >= CHUNK:
        yield items[i : i + CHUNK]
        i += CHUNK
    size = 256
    while i < n:
        if n - i >= size:
            yield items[i : i + size]
            i += size
        else:
            size //= 2
