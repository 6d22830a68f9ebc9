"""The outcome record: what the gateway hands to the recorder for every served row."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Outcome"]


@dataclass(frozen=True)
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

    def to_row(self) -> dict[str, object]:
        import json

        return {
            "request_id": self.request_id,
            "ecosystem": self.ecosystem,
            "created_at": self.time_s,
            "members": json.dumps(list(self.members)),
            "versions": json.dumps(list(self.versions)),
            "predictions": json.dumps([int(v) for v in self.predictions]),
            "served": int(self.served),
            "intended": int(self.intended),
            "greedy": int(self.greedy),
            "propensities": json.dumps([float(v) for v in self.propensities]),
            "policy": self.policy,
            "direct": self.direct,
            "groups": json.dumps({str(k): str(v) for k, v in self.groups.items()}, sort_keys=True),
            "fingerprint": self.input_fingerprint,
        }
