"""What the recorder must know of an ecosystem to count it: its members, classes (or a regression
ecosystem's agreement bins), subgroups, label mode and assumed label; and how a stored outcome
recorded under another member list maps onto the current one."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from telemetry.counts import EcosystemShape, value_bins

__all__ = ["EcosystemSpec"]


@dataclass(frozen=True)
class EcosystemSpec:
    """What the recorder must know of an ecosystem to count it."""

    name: str
    members: tuple[str, ...]
    classes: tuple[str, ...]
    subgroups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    intersections: tuple[tuple[str, ...], ...] = ()
    compressed: tuple[bool, ...] = ()
    reference: int = 0
    label_mode: Literal["ground_truth", "bandit"] = "ground_truth"
    assume_label_after_s: float | None = None
    assumed_label: str | float | None = None
    # regression: `classes` names the agreement bins (models.manifest.RegressionSpec); a member is
    # correct when |value - label| <= tolerance; label-free metrics compare the values' bins
    # ranking: `classes` are the catalogue's items then the no-click label (its id: n_items); each
    # outcome records every member's top-k list; a member is correct on a click in its list
    task: Literal["classification", "regression", "ranking"] = "classification"
    k: int = 0
    tolerance: float = 0.0
    bin_low: float = 0.0
    bin_width: float = 1.0

    def __post_init__(self) -> None:
        # labels that are plain class ids 0..n-1 (ground-truth classification): `label_value`'s fast path
        plain = self.label_mode != "bandit" and self.task in ("classification", "ranking")
        object.__setattr__(self, "_class_ids", len(self.classes) if plain else 0)

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    @property
    def ranking(self) -> bool:
        return self.task == "ranking"

    @property
    def no_click(self) -> int:
        """A ranking ecosystem's no-click label id (after the items)."""
        return len(self.classes) - 1

    def raw_predictions(self, rows: Sequence[Sequence[Any]], n: int, width: int | None = None) -> np.ndarray:
        """Stored predictions as an (n, M) array: class ids (int64, -1 missing), or regression
        values (float64, NaN missing)."""
        dtype = np.float64 if self.regression else np.int64
        return np.array(rows, dtype=dtype).reshape(n, len(self.members) if width is None else width)

    def align(
        self, members: Sequence[tuple[str, ...]], preds: Sequence[Sequence[Any]], served: Sequence[int],
        intended: Sequence[int], greedy: Sequence[int], props: Sequence[Sequence[float]],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A batch of outcomes as the current members see them: predictions (n, M) as
        `raw_predictions`; served, intended and greedy member indices (-1: not a current member);
        propensities (n, M). `members` is each outcome's own member list. Outcomes recorded under
        another list (a member added, removed or reordered since, or a gateway still running the
        old config) are mapped by member name: a member they lack has a missing output there, and
        a member no longer in the ecosystem is left out (docs/design.md, "A changed member list")."""
        n, m = len(preds), len(self.members)
        served_, intended_, greedy_ = (np.array(v, dtype=np.int64) for v in (served, intended, greedy))
        kinds = set(members)
        if kinds == {self.members}:
            return (self.raw_predictions(preds, n), served_, intended_, greedy_,
                    np.array(props, dtype=np.float64).reshape(n, m))
        raw = np.full((n, m), np.nan) if self.regression else np.full((n, m), -1, dtype=np.int64)
        props_ = np.zeros((n, m))
        position = {name: i for i, name in enumerate(self.members)}
        for kind in kinds:
            rows = np.array([i for i, mm in enumerate(members) if mm == kind], dtype=np.int64)
            src = np.array([j for j, name in enumerate(kind) if name in position], dtype=np.int64)
            dst = np.array([position[kind[j]] for j in src], dtype=np.int64)
            if len(src):
                block = self.raw_predictions([preds[i] for i in rows], len(rows), len(kind))
                raw[np.ix_(rows, dst)] = block[:, src]
                pblock = np.array([props[i] for i in rows], dtype=np.float64).reshape(len(rows), len(kind))
                props_[np.ix_(rows, dst)] = pblock[:, src]
            to_new = np.array([position.get(name, -1) for name in kind], dtype=np.int64)
            for arr in (served_, intended_, greedy_):
                old = arr[rows]
                arr[rows] = np.where(old >= 0, to_new[np.clip(old, 0, len(kind) - 1)], -1)
        return raw, served_, intended_, greedy_, props_

    def codes(self, raw: np.ndarray) -> np.ndarray:
        """What label-free counts compare: class ids as they are; regression values as their bin
        (values beyond the range in the edge bins), -1 where missing."""
        return value_bins(raw, self.bin_low, self.bin_width, len(self.classes)) if self.regression else raw

    @property
    def shape(self) -> EcosystemShape:
        return EcosystemShape(
            members=self.members,
            n_classes=len(self.classes),
            reference=self.reference,
            compressed=self.compressed,
            subgroups=self.subgroups,
            intersections=self.intersections,
        )

    def label_value(self, raw: object) -> float:
        """A label as the number the store keeps: class id or value (ground_truth), or reward (bandit)."""
        if type(raw) is int and 0 <= raw < self._class_ids:  # type: ignore[attr-defined]
            return float(raw)  # the common case first: a valid class id (bool is not `int` here)
        if isinstance(raw, bool):
            raise ValueError(f"must be a class or a number, got {raw!r}")
        if self.label_mode == "bandit":
            if not isinstance(raw, (int, float)) or not math.isfinite(raw):
                raise ValueError(f"bandit mode: must be a finite number (the reward), got {raw!r}")
            return float(raw)
        if self.regression:
            if not isinstance(raw, (int, float)) or not math.isfinite(raw):
                raise ValueError(f"must be a finite number (the true value of {self.name!r}), got {raw!r}")
            return float(raw)
        if isinstance(raw, str):
            if raw in self.classes:
                return float(self.classes.index(raw))
            raise ValueError(f"{raw!r} is not a class of {self.name!r} ({', '.join(self.classes)})")
        if isinstance(raw, (int, float)) and float(raw).is_integer() and 0 <= raw < len(self.classes):
            return float(int(raw))
        raise ValueError(f"class id {raw!r} out of range for {len(self.classes)} classes of {self.name!r}")
