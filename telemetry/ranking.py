"""Ranking ecosystems: correctness of a list, and the catalogue-level counts (docs/design.md,
"Ranking ecosystems").

Each outcome records every member's top-k list and what was shown (the served member's list, in
slot order, possibly shuffled, with each shown item's propensity of its slot). A label is the
clicked item or "no click". Per outcome and member:

- correct (hit@k) on a click: the clicked item is in the member's list; on "no click" nothing is
  known (-1). "Every member wrong" is then a **systemic miss**: the clicked item is in no member's
  list (the ecosystem's systemic-failure counters count exactly that);
- click-through of the served member: clicks / labeled outcomes it served.

Label-free, at record time: how often each item is in each member's list and in the shown list
(exposure), and how much members' lists overlap (|A & B| / k, summed). At label time: clicks per
item (the popularity the catalogue metrics use), per served member, and per slot.

From those, per list (a member's, or "shown"): **coverage** (share of the catalogue that appeared),
**Gini of exposure** (0: every item shown equally often; toward 1: a few items take all),
**ARP** (average recommendation popularity: the mean popularity, as a share of all clicks, of the
listed items), **APLT** (average percentage of long-tail items: the share of listed items outside
the head, the most-clicked items that together take `HEAD_SHARE` of the clicks).

Counts are additive (`+`), so a restarted recorder rebuilds them from the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["RankingCounts", "ranking_correctness", "gini", "HEAD_SHARE", "SHOWN"]

HEAD_SHARE = 0.2  # the head: the most-clicked items that together take 20% of the clicks
SHOWN = "shown"  # the list label of what was shown


def ranking_correctness(spec: Any, members_of: Sequence[tuple[str, ...]], rankings_of: Sequence[Any],
                        labels: np.ndarray) -> np.ndarray:
    """(N, M) in {1, 0, -1}: the clicked item in the member's list, not in it, or unknown (no
    click, no label, the member gave no list). Lists are mapped onto `spec.members` by name."""
    n, m = len(rankings_of), len(spec.members)
    out = np.full((n, m), -1, dtype=np.int8)
    pos = {name: a for a, name in enumerate(spec.members)}
    for i, (members, lists) in enumerate(zip(members_of, rankings_of)):
        label = labels[i]
        if not lists or label != label or int(label) < 0 or int(label) >= spec.no_click:
            continue
        item = int(label)
        for name, items in zip(members, lists):
            a = pos.get(name)
            if a is not None and items is not None:
                out[i, a] = 1 if item in items else 0
    return out


def gini(x: np.ndarray) -> float | None:
    """Gini coefficient of non-negative counts (0: equal; (n-1)/n: one item takes all)."""
    if x.size == 0 or x.sum() <= 0:
        return None
    s = np.sort(x.astype(np.float64))
    n = s.size
    return float((2 * np.arange(1, n + 1) - n - 1).dot(s) / (n * s.sum()))


class RankingCounts:
    """Additive counts of one ranking ecosystem (M members, I items, k slots)."""

    def __init__(self, members: tuple[str, ...], n_items: int, k: int) -> None:
        self.members, self.n_items, self.k = members, n_items, k
        m = len(members)
        self.listed = np.zeros((m + 1, n_items), dtype=np.int64)  # row m: the shown lists
        self.lists = np.zeros(m + 1, dtype=np.int64)  # lists recorded (per member; row m: shown)
        self.overlap = np.zeros((m, m))  # summed |A & B| / k over outcomes where both gave a list
        self.pairs = np.zeros((m, m), dtype=np.int64)
        self.clicks_item = np.zeros(n_items, dtype=np.int64)
        self.served_labeled = np.zeros(m, dtype=np.int64)
        self.served_clicks = np.zeros(m, dtype=np.int64)  # a click on an item of the shown list
        self.slot_labeled = np.zeros(k, dtype=np.int64)  # labeled outcomes, per slot shown (all of them)
        self.slot_clicks = np.zeros(k, dtype=np.int64)

    def __add__(self, other: RankingCounts) -> RankingCounts:
        out = RankingCounts(self.members, self.n_items, self.k)
        for name in ("listed", "lists", "overlap", "pairs", "clicks_item", "served_labeled", "served_clicks",
                     "slot_labeled", "slot_clicks"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    # ------------------------------------------------------------ counting
    def count_recorded(self, members_of: Sequence[tuple[str, ...]], rankings_of: Sequence[Any],
                       shown_of: Sequence[Any]) -> None:
        pos = {name: a for a, name in enumerate(self.members)}
        m = len(self.members)
        for members, lists, shown in zip(members_of, rankings_of, shown_of):
            if not lists:
                continue
            sets: list[set[int] | None] = [None] * m
            for name, items in zip(members, lists):
                a = pos.get(name)
                if a is None or items is None:
                    continue
                valid = [i for i in items if 0 <= i < self.n_items]
                self.listed[a, valid] += 1
                self.lists[a] += 1
                sets[a] = set(valid)
            if shown:
                ids = [i for i in shown[0] if 0 <= i < self.n_items]
                self.listed[m, ids] += 1
                self.lists[m] += 1
            for a in range(m):
                sa = sets[a]
                if sa is None:
                    continue
                for b in range(m):
                    sb = sets[b]
                    if sb is not None:
                        self.overlap[a, b] += len(sa & sb) / self.k
                        self.pairs[a, b] += 1

    def count_labeled(self, members_of: Sequence[tuple[str, ...]], served: Sequence[int], shown_of: Sequence[Any],
                      labels: np.ndarray, no_click: int) -> None:
        """First labels: the clicked item (or `no_click`) of outcomes as recorded (`served`: the
        index in the outcome's own member list)."""
        pos = {name: a for a, name in enumerate(self.members)}
        for members, s, shown, label in zip(members_of, served, shown_of, labels.tolist()):
            if not shown or label != label:
                continue
            ids = list(shown[0])
            item = int(label)
            clicked = 0 <= item < no_click and item in ids
            if 0 <= item < min(no_click, self.n_items):
                self.clicks_item[item] += 1
            self.slot_labeled[: len(ids)] += 1
            if clicked:
                self.slot_clicks[ids.index(item)] += 1
            a = pos.get(members[s]) if 0 <= s < len(members) else None
            if a is not None:
                self.served_labeled[a] += 1
                self.served_clicks[a] += int(clicked)

    # ------------------------------------------------------------ reading
    def list_names(self) -> list[str]:
        return [*self.members, SHOWN]

    def head(self) -> np.ndarray:
        """Items in the head: the most-clicked ones that together take HEAD_SHARE of the clicks."""
        total = self.clicks_item.sum()
        head = np.zeros(self.n_items, dtype=bool)
        if total <= 0:
            return head
        order = np.argsort(-self.clicks_item, kind="stable")
        cum = np.cumsum(self.clicks_item[order]) / total
        n_head = int(np.searchsorted(cum, HEAD_SHARE) + 1)
        head[order[:n_head]] = True
        return head

    def catalogue(self) -> dict[str, dict[str, float | None]]:
        """Per list: coverage, Gini of exposure, ARP and APLT (the last two need clicks)."""
        total = self.clicks_item.sum()
        popularity = self.clicks_item / total if total else None
        head = self.head()
        out = {}
        for row, name in enumerate(self.list_names()):
            listed = self.listed[row]
            n = listed.sum()
            out[name] = {
                "coverage": float((listed > 0).mean()) if self.lists[row] else None,
                "gini": gini(listed) if self.lists[row] else None,
                "arp": float(listed.dot(popularity) / n) if popularity is not None and n else None,
                "aplt": float(listed[~head].sum() / n) if popularity is not None and n else None,
            }
        return out
