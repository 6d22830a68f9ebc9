"""The feedback API's wire format: `POST /v2/feedback` with one label or a batch.

Accepted bodies: one item `{"request_id": ..., "label": ...}`, a list of items, or
`{"labels": [items]}`. An item: `request_id` (the id the inference response gave,
or the client's own), `label` (a class name or class id; a reward in bandit mode),
optional `timestamp` (when the label was observed: unix seconds or ISO 8601;
default: arrival), optional `source` (free text, at most 64 characters, kept in the label history). Ids and text
follow `telemetry.text` (an id: 1-128 visible ASCII characters).
Unknown fields are rejected. Every item is validated before anything is applied;
a bad item fails the whole request with 422 naming its index and field.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from serving.errors import PayloadTooLarge, UnprocessableEntity
from telemetry.recorder import LabelItem
from telemetry.text import MAX_TEXT_LENGTH, id_problem, text_problem

__all__ = ["FeedbackItem", "parse_feedback", "checked_id", "item_error", "unix_seconds"]


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    label: int | float | str
    timestamp: float | str | None = None
    source: str = ""

    _request_id = field_validator("request_id", mode="before")(classmethod(lambda cls, v: checked_id(v)))

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v: object) -> object:
        problem = text_problem(v, MAX_TEXT_LENGTH)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("label", mode="before")
    @classmethod
    def _label(cls, v: int | float | str) -> int | float | str:
        if isinstance(v, bool):
            raise ValueError("must be a class name, a class id or a number, not a boolean")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be finite")
        if isinstance(v, str):
            problem = "must not be empty" if not v else text_problem(v, 128)
            if problem is not None:
                raise ValueError(problem)
        return v

    @field_validator("timestamp")
    @classmethod
    def _timestamp(cls, v: float | str | None) -> float | None:
        return unix_seconds(v)


def checked_id(v: object) -> object:
    """A request id that passes `telemetry.text.id_problem`, else a ValueError saying why (the body
    of the `request_id` validators of every API that takes ids)."""
    problem = id_problem(v)
    if problem is not None:
        raise ValueError(problem)
    return v


def item_error(i: int, exc: ValidationError) -> UnprocessableEntity:
    """The first problem pydantic found in item `i` of a batch, as a 422 naming the item and field."""
    e = exc.errors()[0]
    return UnprocessableEntity(f"item {i}: {'.'.join(str(p) for p in e['loc']) or 'item'}: {e['msg']}")


def unix_seconds(v: float | str | None) -> float | None:
    """A client's time: unix seconds, or ISO 8601 text (`Z` for UTC); None stays None."""
    if v is None:
        return None
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError as exc:
            raise ValueError(f"not an ISO 8601 time or unix seconds: {v[:40]!r}") from exc
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"must be non-negative unix seconds, got {v}")
    return float(v)


def parse_feedback(body: Any, max_items: int) -> list[LabelItem]:
    if isinstance(body, dict) and "labels" in body:
        extra = set(body) - {"labels"}
        if extra:
            raise UnprocessableEntity(f"unknown field {sorted(extra)[0]!r} beside 'labels'")
        raw = body["labels"]
    elif isinstance(body, dict):
        raw = [body]
    else:
        raw = body
    if not isinstance(raw, list):
        raise UnprocessableEntity("expected a label object, a list of them, or {\"labels\": [...]}")
    if not raw:
        raise UnprocessableEntity("no labels in the request")
    if len(raw) > max_items:
        raise PayloadTooLarge(f"{len(raw)} labels in one request; the limit is {max_items}")
    items = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise UnprocessableEntity(f"item {i}: expected an object, got {type(entry).__name__}")
        try:
            it = FeedbackItem.model_validate(entry)
        except ValidationError as exc:
            raise item_error(i, exc) from exc
        assert it.timestamp is None or isinstance(it.timestamp, float)
        items.append(LabelItem(it.request_id, it.label, it.timestamp, it.source))
    return items
