"""The outcome record: what the gateway hands to the recorder for every served row."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Outcome", "RowEncoder", "ROW_COLUMNS"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One row's record: what every member said, who served, with what propensity."""

    request_id: str
    ecosystem: str
    time_s: float  # prediction time, unix seconds
    members: tuple[str, ...]
    versions: tuple[str, ...]
    predictions: tuple[int, ...]  # class id per member, -1 = missing
    served: int  # index of the member whose output was returned
    intended: int  # index the policy chose (differs from served on fallback)
    propensities: tuple[float, ...]
    greedy: int
    policy: str
    direct: bool  # the client addressed one member directly
    groups: dict[str, str] = field(default_factory=dict)
    input_fingerprint: str = ""

    @property
    def propensity(self) -> float:
        return self.propensities[self.intended]

    @property
    def fallback(self) -> bool:
        return self.served != self.intended


ROW_COLUMNS = (
    "request_id", "ecosystem", "created_at", "members", "versions", "predictions", "served", "intended", "greedy",
    "propensities", "policy", "direct", "groups", "fingerprint",
)


class RowEncoder:
    """Outcomes -> store rows (tuples in `ROW_COLUMNS` order), JSON columns included.

    The recorder's hottest path: member/version lists, propensity vectors and group dicts repeat
    from row to row, so their JSON is cached (bounded); class ids are ints, joined directly.
    Produces exactly what `json.dumps` would (a test compares)."""

    def __init__(self, max_cache: int = 4096) -> None:
        self.max_cache = max_cache
        self._names: dict[tuple[str, ...], str] = {}
        self._props: dict[tuple[float, ...], str] = {}
        self._groups: dict[tuple[tuple[str, str], ...], str] = {}
        self._preds: dict[tuple[int, ...], str] = {}  # members mostly agree: few distinct vectors

    def _cached(self, cache: dict[Any, str], key: Any, make: Callable[[], str]) -> str:
        v = cache.get(key)
        if v is None:
            if len(cache) >= self.max_cache:
                cache.clear()
            v = cache[key] = make()
        return v

    def rows(self, outcomes: Sequence[Outcome]) -> list[tuple[Any, ...]]:
        names, props, groups, preds = self._names, self._props, self._groups, self._preds
        out = []
        for o in outcomes:
            members = names.get(o.members) or self._cached(names, o.members, lambda: json.dumps(list(o.members)))
            versions = names.get(o.versions) or self._cached(names, o.versions, lambda: json.dumps(list(o.versions)))
            p = props.get(o.propensities) or self._cached(
                props, o.propensities, lambda: json.dumps([float(v) for v in o.propensities]))
            gkey = tuple(sorted(o.groups.items())) if o.groups else ()
            g = groups.get(gkey) or self._cached(
                groups, gkey, lambda: json.dumps({str(k): str(v) for k, v in gkey}, sort_keys=True))
            pr = preds.get(o.predictions) or self._cached(
                preds, o.predictions, lambda: "[" + ", ".join(map(str, map(int, o.predictions))) + "]")
            out.append((
                o.request_id, o.ecosystem, o.time_s, members, versions, pr,
                int(o.served), int(o.intended), int(o.greedy), p, o.policy, bool(o.direct), g, o.input_fingerprint,
            ))
        return out
