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
the head, the most-clicked items that together take `HEAD_SHARE` of the clicks). Popularity, as in
the literature's "popularity in the training data", counts every click since the store began.

Off-policy estimates, for every member, of the click-through its list would get if it served
every request in its own order, from outcomes routed by the policy (not direct calls, no fallback):
with w = 1 / the policy's propensity of the served member, and a click's reward corrected for
position bias as theta[its rank in the served list] / theta[the slot it was shown in],
IPS = sum over rows the member served of w r / N and SNIPS = the same / sum of w, with normal
(IPS) and delta-method (SNIPS) 95% intervals. theta, the examination probability of each slot
relative to the top one, is estimated from the rows whose lists were shuffled (there the item in a
slot is a random item of the list, so clicks per slot follow examination alone); without shuffled
rows no correction is made (theta = 1).

Counts are additive (`+`), so a restarted recorder rebuilds them from the store.
"""

from __future__ import annotations

import math
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


def wilson_float(p: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion p observed on a (possibly fractional) n."""
    if n <= 0:
        return 0.0, 1.0
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


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
        self.shuffled_labeled = np.zeros(k, dtype=np.int64)  # the same, rows whose list was shuffled
        self.shuffled_clicks = np.zeros(k, dtype=np.int64)
        # off-policy sums over policy-routed labeled rows: N; per served member sum w, sum w^2; per
        # (member, rank in its list, slot shown) of clicks: sum w, sum w^2
        self.routed = 0
        self.sum_w = np.zeros(m)
        self.sum_w2 = np.zeros(m)
        self.click_w = np.zeros((m, k, k))
        self.click_w2 = np.zeros((m, k, k))

    @classmethod
    def of_stored(cls, members: tuple[str, ...], n_items: int, k: int, outcomes: Sequence[Any],
                  labels: np.ndarray) -> RankingCounts:
        """The counts of stored outcomes given their labels (NaN: none; `n_items`: no click)."""
        counts = cls(members, n_items, k)
        counts.count_recorded([o.members for o in outcomes], [o.rankings for o in outcomes],
                              [o.shown for o in outcomes])
        counts.count_labeled(outcomes, labels, n_items)
        return counts

    def __add__(self, other: RankingCounts) -> RankingCounts:
        out = RankingCounts(self.members, self.n_items, self.k)
        for name in ("listed", "lists", "overlap", "pairs", "clicks_item", "served_labeled", "served_clicks",
                     "slot_labeled", "slot_clicks", "shuffled_labeled", "shuffled_clicks", "routed", "sum_w", "sum_w2",
                     "click_w", "click_w2"):
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

    def count_labeled(self, items: Sequence[Any], labels: np.ndarray, no_click: int) -> None:
        """First labels (the clicked item, or `no_click`) of stored outcomes."""
        pos = {name: a for a, name in enumerate(self.members)}
        for o, label in zip(items, labels.tolist()):
            shown = o.shown
            if not shown or label != label:
                continue
            ids, ranks, shuffled = list(shown[0]), list(shown[2]), bool(shown[3])
            item = int(label)
            slot = ids.index(item) if 0 <= item < no_click and item in ids else -1
            if 0 <= item < min(no_click, self.n_items):
                self.clicks_item[item] += 1
            self.slot_labeled[: len(ids)] += 1
            if shuffled:
                self.shuffled_labeled[: len(ids)] += 1
            if slot >= 0:
                self.slot_clicks[slot] += 1
                if shuffled:
                    self.shuffled_clicks[slot] += 1
            s = o.served
            a = pos.get(o.members[s]) if 0 <= s < len(o.members) else None
            if a is None:
                continue
            self.served_labeled[a] += 1
            self.served_clicks[a] += int(slot >= 0)
            if o.direct or o.served != o.intended or not o.propensities:
                continue  # off-policy estimates use only rows served as the policy chose
            w = 1.0 / max(float(o.propensities[o.intended]), 1e-12)
            self.routed += 1
            self.sum_w[a] += w
            self.sum_w2[a] += w * w
            if slot >= 0:
                self.click_w[a, ranks[slot], slot] += w
                self.click_w2[a, ranks[slot], slot] += w * w

    # ------------------------------------------------------------ reading
    def list_names(self) -> list[str]:
        return [*self.members, SHOWN]

    def head(self, clicks: np.ndarray | None = None) -> np.ndarray:
        """Items in the head: the most-clicked ones (by `clicks`, default these counts' own) that
        together take HEAD_SHARE of the clicks."""
        clicks = self.clicks_item if clicks is None else clicks
        total = clicks.sum()
        head = np.zeros(self.n_items, dtype=bool)
        if total <= 0:
            return head
        order = np.argsort(-clicks, kind="stable")
        cum = np.cumsum(clicks[order]) / total
        n_head = int(np.searchsorted(cum, HEAD_SHARE) + 1)
        head[order[:n_head]] = True
        return head

    def examination(self) -> np.ndarray | None:
        """theta per slot, relative to the top slot, from shuffled rows (None: none yet, or no click
        in the top slot of one)."""
        if not self.shuffled_labeled[0] or not self.shuffled_clicks[0]:
            return None
        ctr = self.shuffled_clicks / np.maximum(self.shuffled_labeled, 1)
        theta: np.ndarray = np.maximum(ctr / ctr[0], 1e-3)
        return theta

    def estimates(self) -> dict[str, dict[str, float | None]]:
        """Per member: IPS and SNIPS of its click-through in its own order, with 95% intervals."""
        from telemetry.estimation import Z95

        theta = self.examination()
        rho = np.ones((self.k, self.k)) if theta is None else theta[:, None] / theta[None, :]
        out: dict[str, dict[str, float | None]] = {}
        n = self.routed
        for a, name in enumerate(self.members):
            r1 = float((self.click_w[a] * rho).sum())  # sum w r
            w2r = float((self.click_w2[a] * rho).sum())  # sum w^2 r
            w2r2 = float((self.click_w2[a] * rho**2).sum())  # sum w^2 r^2
            est: dict[str, float | None] = {"ips": None, "ips_lower": None, "ips_upper": None, "snips": None,
                                            "snips_lower": None, "snips_upper": None}
            if n:
                ips = r1 / n
                h = Z95 * math.sqrt(max(0.0, w2r2 / n - ips * ips) / n)
                est |= {"ips": ips, "ips_lower": max(0.0, ips - h), "ips_upper": ips + h}
            sw = float(self.sum_w[a])
            if sw > 0:
                v = r1 / sw
                var = max(0.0, w2r2 - 2 * v * w2r + v * v * float(self.sum_w2[a])) / sw**2
                h = Z95 * math.sqrt(var)
                # few clicks make the delta method's interval too narrow (none: zero width); the
                # Wilson interval at the effective sample size (sum w)^2 / sum w^2 bounds it from outside
                n_eff = sw * sw / float(self.sum_w2[a])
                lo_w, hi_w = wilson_float(min(max(v, 0.0), 1.0), n_eff)
                est |= {"snips": v, "snips_lower": max(0.0, min(v - h, lo_w)), "snips_upper": max(v + h, hi_w)}
            out[name] = est
        return out

    def catalogue(self, clicks: np.ndarray | None = None) -> dict[str, dict[str, float | None]]:
        """Per list: coverage, Gini of exposure, ARP and APLT (the last two need clicks). An item's
        popularity is its share of `clicks` (default these counts' own; the recorder passes every
        click since the store began: what the members could have learned from)."""
        clicks = self.clicks_item if clicks is None else clicks
        total = clicks.sum()
        popularity = clicks / total if total else None
        head = self.head(clicks)
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
