"""The outcome record: what the gateway hands to the recorder for every served row."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np

__all__ = ["Outcome", "RowEncoder", "ROW_COLUMNS", "PAYLOAD_FIELDS", "ContextId", "outcome_fields", "payload_text",
           "round_scores"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One row's record: what every member said, who served, with what propensity."""

    request_id: str
    ecosystem: str
    time_s: float  # prediction time, unix seconds
    members: tuple[str, ...]
    versions: tuple[str, ...]
    predictions: tuple[int, ...] | tuple[float | None, ...]  # class id per member, -1 = missing;
    # regression: the value per member, None = missing
    served: int  # index of the member whose output was returned
    intended: int  # index the policy chose (differs from served on fallback)
    propensities: tuple[float, ...]
    greedy: int
    policy: str
    direct: bool  # the client addressed one member directly
    groups: dict[str, str] = field(default_factory=dict)
    input_fingerprint: str = ""
    # per member: its score for the class it predicted (a probability; NaN: none, e.g. a missing
    # output or a member without scores); empty for regression and for outcomes from outside
    scores: tuple[float, ...] = ()
    # per member: its scores of every class, or None (`telemetry.score_vector_max_classes`; empty: not recorded)
    score_vectors: tuple[tuple[float, ...] | None, ...] = ()
    # candidate versions run in shadow, one per candidate that ran: (member index, the version the
    # member serves, the candidate version, the candidate's output (class id, -1: missing;
    # regression: value or None), its score of that output or None)
    candidates: tuple[tuple[int, str, str, Any, float | None], ...] = ()
    # pipeline members' stages: (member index, 0: the serving version's stage / 1: its candidate's,
    # stage name, stage version, fingerprint of the output it passed on (hex), its own class id or
    # None, its score of that class or None)
    stages: tuple[tuple[int, int, str, str, str, int | None, float | None], ...] = ()
    # ranking: each member's top-k item ids (None: no output), and what was shown: (item ids in slot
    # order, each shown item's propensity of being in its slot, each one's rank in the served
    # member's list, 1 if the row's list was shuffled else 0); empty for other tasks
    rankings: tuple[tuple[int, ...] | None, ...] = ()
    shown: tuple[Any, ...] = ()

    @property
    def propensity(self) -> float:
        return self.propensities[self.intended]

    @property
    def fallback(self) -> bool:
        return self.served != self.intended


# Outcome -> the plain tuple of its fields, in declaration order: what crosses from a gateway to
# its recorder's process (`serving.recording.process`), counted and encoded without rebuilding it
outcome_fields: Callable[[Outcome], tuple[Any, ...]] = attrgetter(*Outcome.__slots__)

ROW_COLUMNS = ("request_id", "ecosystem", "created_at", "context", "payload", "propensities", "groups")
# the payload: one JSON array of ints (and the fingerprint) per outcome, decoded in one call per
# batch; propensity vectors and group objects keep their own columns, because their JSON (floats,
# objects) repeats from row to row and is decoded once per distinct text (`telemetry.store`)
# scores, score_vectors, candidates, stages, rankings and shown: optional (a payload with a later one has null for each earlier one it lacks)
PAYLOAD_FIELDS = ("predictions", "served", "intended", "greedy", "direct", "fingerprint", "scores", "score_vectors",
                  "candidates", "stages", "rankings", "shown")



def payload_text(predictions: str, served: int, intended: int, greedy: int, direct: bool, fingerprint: str) -> str:
    """The payload of one row, from its predictions' JSON (what the v2 -> v3 migration writes;
    `RowEncoder` writes the same text, with the repeated middle cached)."""
    return (f"[{predictions},{int(served)},{int(intended)},{int(greedy)},{'true' if direct else 'false'},"
            f"{json.dumps(fingerprint)}]")


ContextId = Callable[[str, str, str], int]  # (members JSON, versions JSON, policy) -> the store's context id


class RowEncoder:
    """Outcomes, as field tuples (`outcome_fields`) -> store rows (tuples in `ROW_COLUMNS` order).

    A row is the outcome's id, ecosystem and time, its context (the id of its member list,
    version list and policy, stored once in `ecoserve_contexts`), one JSON array of the ints and
    the fingerprint (`PAYLOAD_FIELDS`), and the propensities' and groups' JSON: 7 values to bind
    instead of 14 (docs/store.md).

    The recorder's hottest path: member/version lists, prediction and propensity vectors and
    group dicts repeat from row to row, so their JSON is cached (bounded); a value that is the
    same object as the previous row's (one runner's tuples; pickle keeps that sharing) reuses its
    JSON without hashing it again. The propensities' and groups' JSON is what `json.dumps` writes;
    the payload decodes to the same values as `json.dumps` of them would (a test compares)."""

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

    def rows_of_fields(self, items: Sequence[tuple[Any, ...]], context_id: ContextId) -> list[tuple[Any, ...]]:
        """Field tuples (`outcome_fields`) -> rows; `context_id` maps a context to its id."""
        names, props, groups, preds, fill = self._names, self._props, self._groups, self._preds, self._fill
        out = []
        last_m: Any = None
        last_v: Any = None
        last_pol: Any = None
        last_p: Any = None
        last_g: Any = None
        last_s = last_i = last_gr = last_d = None
        jm = jv = jp = jg = mid = ""
        ctx = 0
        for rid, eco, t, members, versions, predictions, served, intended, propensities, greedy, policy, direct, \
                grp, fingerprint, scores, vectors, cands, stages, rankings, shown in items:
            if members is not last_m or versions is not last_v or policy is not last_pol:
                if members is not last_m:
                    last_m, jm = members, names.get(members) or fill(names, members, _json_list)
                if versions is not last_v:
                    last_v, jv = versions, names.get(versions) or fill(names, versions, _json_list)
                last_pol, ctx = policy, context_id(jm, jv, policy)
            if propensities is not last_p:
                last_p, jp = propensities, props.get(propensities) or fill(props, propensities, _json_floats)
            if grp is not last_g:
                last_g = grp
                gkey = tuple(sorted(grp.items())) if grp else ()
                jg = groups.get(gkey) or fill(groups, gkey, _json_groups)
            if served != last_s or intended != last_i or greedy != last_gr or direct != last_d:
                last_s, last_i, last_gr, last_d = served, intended, greedy, direct
                mid = f",{int(served)},{int(intended)},{int(greedy)},{'true' if direct else 'false'},"
            jpred = preds.get(predictions) or fill(preds, predictions, _json_predictions)
            if vectors or cands or stages or rankings:
                extras = (scores, vectors, cands, stages, rankings, shown)
                last = max(i for i, v in enumerate(extras) if v)
                parts = [_EXTRA_JSON[i](v) if v else "null" for i, v in enumerate(extras[: last + 1])]
                tail = "," + ",".join(parts) + "]"
            else:
                tail = f",{_json_scores(scores)}]" if scores else "]"
            if fingerprint.isalnum():  # the gateway's: hex digests (any letter or digit is valid raw in JSON)
                out.append((rid, eco, t, ctx, f'[{jpred}{mid}"{fingerprint}"{tail}', jp, jg))
            else:
                text = payload_text(jpred, served, intended, greedy, direct, fingerprint)
                out.append((rid, eco, t, ctx, text[:-1] + tail, jp, jg))
        return out


def _json_list(names: tuple[str, ...]) -> str:
    return json.dumps(list(names))


def _json_predictions(values: tuple[int | float | None, ...]) -> str:
    """Class ids, or regression values (None: missing, JSON null)."""
    return "[" + ", ".join(map(_json_prediction, values)) + "]"


def _json_prediction(v: int | float | None) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else "null"
    return "null" if v is None else str(int(v))


def _json_scores(values: tuple[float, ...]) -> str:
    """Scores to 4 significant digits (what calibration can use; 6 characters each); NaN or an
    infinity (a model's odd output) as null."""
    text = ",".join(map(_SCORE_FORMAT, values))
    if "n" in text:  # "nan", "inf": the rare row with a missing score
        text = ",".join(_SCORE_FORMAT(v) if math.isfinite(v) else "null" for v in values)
    return "[" + text + "]"


_SCORE_FORMAT = "{:.4g}".format


def round_scores(a: np.ndarray) -> np.ndarray:
    """Scores to the 4 significant digits the store keeps (NaN stays NaN): the gateway computes a
    row's risk from exactly what is recorded, so the estimator gives the same value offline even
    where a calibration bin edge lies between a score and its stored digits."""
    with np.errstate(divide="ignore", invalid="ignore"):
        step = 10.0 ** (np.floor(np.log10(np.abs(a))) - 3)
        out = np.round(a / step) * step
    return np.where(np.isfinite(out), out, a)


def _json_candidates(cands: tuple[tuple[int, str, str, Any, float | None], ...]) -> str:
    return json.dumps([[int(a), str(cur), str(v), None if p is None or p != p else p,
                        None if s is None or not math.isfinite(s) else float(_SCORE_FORMAT(s))]
                       for a, cur, v, p, s in cands])


def _json_stages(stages: tuple[tuple[int, int, str, str, str, int | None, float | None], ...]) -> str:
    return json.dumps([[int(a), int(role), str(name), str(v), str(fp), None if c is None else int(c),
                        None if s is None or not math.isfinite(s) else float(_SCORE_FORMAT(s))]
                       for a, role, name, v, fp, c, s in stages])


def _json_rankings(lists: tuple[tuple[int, ...] | None, ...]) -> str:
    return json.dumps([None if v is None else [int(i) for i in v] for v in lists])


def _json_shown(shown: tuple[Any, ...]) -> str:
    ids, props, ranks, shuffled = shown
    return json.dumps([[int(i) for i in ids], [float(_SCORE_FORMAT(p)) for p in props], [int(r) for r in ranks],
                       int(shuffled)])


def _json_vectors(vectors: tuple[tuple[float, ...] | None, ...]) -> str:
    return "[" + ",".join("null" if v is None else _json_scores(v) for v in vectors) + "]"


def _json_floats(values: tuple[float, ...]) -> str:
    return json.dumps([float(v) for v in values])


def _json_groups(items: tuple[tuple[str, str], ...]) -> str:
    return json.dumps({str(k): str(v) for k, v in items}, sort_keys=True)


# the payload's optional elements after the fingerprint, in PAYLOAD_FIELDS order
_EXTRA_JSON: tuple[Callable[[Any], str], ...] = (_json_scores, _json_vectors, _json_candidates, _json_stages,
                                                 _json_rankings, _json_shown)
