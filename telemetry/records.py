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

    def _fill(self, cache: dict[Any, str], key: Any, make: Callable[[Any], str]) -> str:
        if len(cache) >= self.max_cache:
            cache.clear()
        v = cache[key] = make(key)
        return v

    def rows(self, outcomes: Sequence[Outcome]) -> list[tuple[Any, ...]]:
        names, props, groups, preds, fill = self._names, self._props, self._groups, self._preds, self._fill
        out = []
        for o in outcomes:
            gkey = tuple(sorted(o.groups.items())) if o.groups else ()
            out.append((
                o.request_id, o.ecosystem, o.time_s,
                names.get(o.members) or fill(names, o.members, _json_list),
                names.get(o.versions) or fill(names, o.versions, _json_list),
                preds.get(o.predictions) or fill(preds, o.predictions, _json_ints),
                int(o.served), int(o.intended), int(o.greedy),
                props.get(o.propensities) or fill(props, o.propensities, _json_floats),
                o.policy, bool(o.direct),
                groups.get(gkey) or fill(groups, gkey, _json_groups),
                o.input_fingerprint,
            ))
        return out


def _json_list(names: tuple[str, ...]) -> str:
    return json.dumps(list(names))


def _json_ints(values: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, map(int, values))) + "]"


def _json_floats(values: tuple[float, ...]) -> str:
    return json.dumps([float(v) for v in values])


def _json_groups(items: tuple[tuple[str, str], ...]) -> str:
    return json.dumps({str(k): str(v) for k, v in items}, sort_keys=True)
