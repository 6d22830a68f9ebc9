"""The recorder's event counters: API events (duplicates, corrections, unknown ids, expiries...) and
records lost or refused, typed, and how they are kept in the store.

The store keeps them in `ecoserve_event_counts` as `key -> count`, so a restarted recorder starts
from the same numbers. Keys: an `Event`'s value for the recorder-wide counters, and
`duplicates|ECO`, `lost|ECO`, `corrections|ECO|FROM|TO` for the per-ecosystem ones (the store
itself writes `lost|ECO` when it reclaims a crashed gateway's ledger).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["Event", "EventCounts"]


class Event(Enum):
    """A recorder-wide event counter; the value is its key in the store."""

    UNKNOWN_IDS = "unknown_ids"  # labels whose outcome was not stored yet (held as pending)
    EXPIRED = "expired"  # pending labels dropped after their TTL
    PENDING_REJECTED = "pending_rejected"  # held labels their outcome's ecosystem could not take
    PENDING_OUT_OF_SCOPE = "pending_out_of_scope"  # held labels whose token did not cover their outcome's ecosystem
    DUPLICATE_OUTCOME_IDS = "duplicate_outcome_ids"  # outcome records whose id was already stored
    UNKNOWN_ECOSYSTEM = "unknown_ecosystem"  # outcome records of an ecosystem not served here
    INVALID_OUTCOMES = "invalid_outcomes"  # outcome records the store refused (a data error)


@dataclass
class EventCounts:
    """Event counters: recorder-wide (`totals`) and per ecosystem. Adding one `EventCounts` to
    another adds every counter; `store_increments` is what to bump in the store for it."""

    totals: Counter[Event] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)  # ecosystem -> labels equal to the current one
    lost: Counter[str] = field(default_factory=Counter)  # ecosystem -> records lost in gateway crashes
    corrections: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (ecosystem, from, to)

    def __getitem__(self, event: Event) -> int:
        return self.totals[event]

    def add(self, other: EventCounts) -> None:
        self.totals.update(other.totals)
        self.duplicates.update(other.duplicates)
        self.lost.update(other.lost)
        self.corrections.update(other.corrections)

    def copy(self) -> EventCounts:
        return EventCounts(Counter(self.totals), Counter(self.duplicates), Counter(self.lost),
                           Counter(self.corrections))

    def store_increments(self) -> dict[str, int]:
        """The store keys and increments of these counts (`lost` excepted: the store writes it)."""
        out = {e.value: n for e, n in self.totals.items() if n}
        out |= {f"duplicates|{eco}": n for eco, n in self.duplicates.items() if n}
        out |= {f"corrections|{eco}|{src}|{dst}": n for (eco, src, dst), n in self.corrections.items() if n}
        return out

    @classmethod
    def from_store(cls, stored: dict[str, int], ecosystems: set[str]) -> EventCounts:
        """The counters kept in the store, for the ecosystems served now (others are left out)."""
        by_value = {e.value: e for e in Event}
        counts = cls()
        for key, n in stored.items():
            parts = key.split("|")
            if len(parts) == 1 and key in by_value:
                counts.totals[by_value[key]] = n
            elif len(parts) == 2 and parts[1] in ecosystems and parts[0] == "duplicates":
                counts.duplicates[parts[1]] = n
            elif len(parts) == 2 and parts[1] in ecosystems and parts[0] == "lost":
                counts.lost[parts[1]] = n
            elif len(parts) == 4 and parts[0] == "corrections" and parts[1] in ecosystems:
                counts.corrections[(parts[1], parts[2], parts[3])] = n
        return counts
