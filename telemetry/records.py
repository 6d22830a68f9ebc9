"""The outcome record: what the gateway hands to the recorder for every served row."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

__all__ = ["Outcome", "RowEncoder", "ROW_COLUMNS", "outcome_fields"]


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


# Outcome -> the plain tuple of its fields, in declaration order: what crosses from a gateway to
# its recorder's process (`serving.recorder_process`), counted and encoded without rebuilding it
outcome_fields: Callable[[Outcome], tuple[Any, ...]] = attrgetter(*Outcome.__slots__)

ROW_COLUMNS = (
    "request_id", "ecosystem", "created_at", "members", "versions", "predictions", "served", "intended", "greedy",
    "propensities", "policy", "direct", "groups", "fingerprint",
)


class RowEncoder:
    """Outcomes, as field tuples (`outcome_fields`) -> store rows (tuples in `ROW_COLUMNS` order), JSON columns included.

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

    def rows_of_fields(self, items: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Field tuples (`outcome_fields`) -> rows. A value that is the same object as the previous
        row's (one runner's member and version tuples; pickle keeps that sharing) reuses its JSON
        without hashing it again."""
        names, props, groups, preds, fill = self._names, self._props, self._groups, self._preds, self._fill
        out = []
        last_m: Any = None
        last_v: Any = None
        last_p: Any = None
        last_g: Any = None
        jm = jv = jp = jg = ""
        for rid, eco, t, members, versions, predictions, served, intended, propensities, greedy, policy, direct, \
                grp, fingerprint in items:
            if members is not last_m:
                last_m, jm = members, names.get(members) or fill(names, members, _json_list)
            if versions is not last_v:
                last_v, jv = versions, names.get(versions) or fill(names, versions, _json_list)
            if propensities is not last_p:
                last_p, jp = propensities, props.get(propensities) or fill(props, propensities, _json_floats)
            if grp is not last_g:
                last_g = grp
                gkey = tuple(sorted(grp.items())) if grp else ()
                jg = groups.get(gkey) or fill(groups, gkey, _json_groups)
            out.append((
                rid, eco, t, jm, jv, preds.get(predictions) or fill(preds, predictions, _json_ints),
                int(served), int(intended), int(greedy), jp, policy, bool(direct), jg, fingerprint,
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
