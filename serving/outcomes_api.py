"""`POST /v2/outcomes`: outcomes recorded from outside, for members whose outputs only ever
arrive that way (`kind: external` in the manifest: a vendor's API called by the client itself,
a model served by another platform whose predictions are logged, a prediction log to import).

Body: `{"outcomes": [record, ...]}`, at most `telemetry.max_feedback_items` records. A record:

    {"request_id": "...",                 # the outcome's id (the rules of every request id)
     "ecosystem": "...",                  # a served ecosystem
     "outputs": {member: output},         # external members only; a class name or id (regression:
                                          # a number), or null = missing; unnamed members are missing
     "served": member,                    # optional: whose output the person received
     "propensity": 0.25,                  # optional, in (0, 1]: the logged probability of serving it
     "subgroups": {attribute: value},     # optional: declared subgroup attributes
     "timestamp": 1764650000.0}           # optional: unix seconds or ISO 8601 (default: arrival)

Every record is validated before anything is applied (422 naming the item and the field). A
record whose id is stored already with the same outputs changes nothing (a replayed batch is
harmless); one that adds outputs of members the stored outcome lacks completes it (an outcome a
mixed ecosystem served, before its label: `Recorder.record_outside`); one that contradicts a
stored output is refused. The outcomes are stored with the policy `external`,
which marks their origin in the store (`ecoserve_outcomes_v.policy`).
"""

from __future__ import annotations

import math
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from models.manifest import EcosystemManifest
from serving.auth import ALL, Scope, check_scope
from serving.errors import PayloadTooLarge, UnprocessableEntity
from serving.feedback import checked_id, item_error, unix_seconds
from telemetry.records import Outcome
from telemetry.text import MAX_TEXT_LENGTH, text_problem

__all__ = ["OutcomeRecord", "parse_outcomes", "EXTERNAL_POLICY"]

EXTERNAL_POLICY = "external"


class OutcomeRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    ecosystem: str
    outputs: dict[str, int | float | str | None]
    served: str | None = None
    propensity: float | None = None
    subgroups: dict[str, str | int | float] = {}
    timestamp: float | str | None = None

    _id = field_validator("request_id", mode="before")(classmethod(lambda cls, v: checked_id(v)))

    @field_validator("propensity")
    @classmethod
    def _propensity(cls, v: float | None) -> float | None:
        if v is not None and not (0 < v <= 1):
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @field_validator("timestamp")
    @classmethod
    def _timestamp(cls, v: float | str | None) -> float | None:
        return unix_seconds(v)


def _fail(i: int, field: str, message: str) -> UnprocessableEntity:
    return UnprocessableEntity(f"item {i}: {field}: {message}")


def _output(manifest: EcosystemManifest, value: int | float | str | None, where: tuple[int, str]) -> Any:
    """A member's output as the record stores it: class id (-1 missing), or value (None missing)."""
    if value is None:
        return None if manifest.regression is not None else -1
    if isinstance(value, bool):
        raise _fail(*where, "must be a class, a number or null, not a boolean")
    if manifest.regression is not None:
        if isinstance(value, str) or not math.isfinite(value):
            raise _fail(*where, "must be a finite number (a regression ecosystem's value) or null")
        return float(value)
    if isinstance(value, str):
        if value not in manifest.classes:
            raise _fail(*where, f"{value[:64]!r} is not a class of {manifest.name!r}")
        return manifest.classes.index(value)
    if float(value).is_integer() and 0 <= value < len(manifest.classes):
        return int(value)
    raise _fail(*where, f"class id {value!r} out of range for {len(manifest.classes)} classes")


def parse_outcomes(body: Any, manifests: dict[str, EcosystemManifest], max_items: int,
                   scope: Scope = ALL) -> list[Outcome]:
    """Validate every record (all or nothing) and build the outcome records; a record of an
    ecosystem outside the caller's token `scope` is a 403 naming it."""
    if not isinstance(body, dict) or set(body) != {"outcomes"} or not isinstance(body["outcomes"], list):
        raise UnprocessableEntity('expected {"outcomes": [record, ...]}')
    raw = body["outcomes"]
    if not raw:
        raise UnprocessableEntity("no outcomes in the request")
    if len(raw) > max_items:
        raise PayloadTooLarge(f"{len(raw)} outcomes in one request; the limit is {max_items}")
    now = time.time()
    out, seen = [], set()
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise UnprocessableEntity(f"item {i}: expected an object, got {type(entry).__name__}")
        try:
            rec = OutcomeRecord.model_validate(entry)
        except ValidationError as exc:
            raise item_error(i, exc) from exc
        manifest = manifests.get(rec.ecosystem)
        if manifest is None:
            raise _fail(i, "ecosystem", f"{rec.ecosystem[:64]!r} is not served here ({', '.join(manifests)})")
        check_scope(scope, rec.ecosystem, f"item {i}")
        if manifest.task == "ranking":
            raise _fail(i, "ecosystem", f"{rec.ecosystem!r} is a ranking ecosystem: its outcomes (every member's "
                        "list) are recorded by its inference endpoint, not posted")
        if rec.request_id in seen:
            raise _fail(i, "request_id", f"{rec.request_id!r} appears twice in this request")
        seen.add(rec.request_id)
        current = manifest.current_members()
        names = [m.name for m in current]
        external = {m.name for m in current if m.kind == "external"}
        for member in rec.outputs:
            if member not in external:
                kind = "not a member" if member not in names else "not an external member (it is served here)"
                raise _fail(i, f"outputs.{member[:64]}", f"{kind} of {rec.ecosystem!r}")
        if rec.served is not None and rec.served not in rec.outputs:
            raise _fail(i, "served", f"{rec.served[:64]!r} is not one of the outputs given")
        if rec.propensity is not None and rec.served is None:
            raise _fail(i, "propensity", "a propensity needs the served member")
        for attr, value in rec.subgroups.items():
            if attr not in manifest.subgroups:
                raise _fail(i, f"subgroups.{attr[:64]}", f"not a declared subgroup attribute of {rec.ecosystem!r}")
            problem = text_problem(str(value), MAX_TEXT_LENGTH)
            if problem is not None:
                raise _fail(i, f"subgroups.{attr}", problem)
        preds = tuple(_output(manifest, rec.outputs.get(n), (i, f"outputs.{n}")) for n in names)
        served = names.index(rec.served) if rec.served is not None else -1
        props = tuple((rec.propensity or 1.0) if a == served else 0.0 for a in range(len(names)))
        out.append(Outcome(
            request_id=rec.request_id, ecosystem=rec.ecosystem,
            time_s=rec.timestamp if isinstance(rec.timestamp, float) else now,
            members=tuple(names), versions=tuple(m.version for m in current), predictions=preds,
            served=served, intended=served, propensities=props, greedy=-1, policy=EXTERNAL_POLICY,
            # without a logged propensity the row is left out of the off-policy estimates
            direct=rec.propensity is None, groups={k: str(v) for k, v in rec.subgroups.items()},
        ))
    return out
