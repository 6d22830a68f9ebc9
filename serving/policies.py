"""Routing policies: which member serves each row, with the propensity it was served with.

Every policy returns, per row, the full propensity vector pi(.|x) it sampled the
served member from, so off-policy estimates (IPS/SNIPS in `telemetry`) are exact:

- `primary`: pi = 1 for the primary member (no exploration).
- `epsilon_greedy`: pi(a) = epsilon / M + (1 - epsilon) [a = greedy]; the greedy
  member has the highest posterior-mean reward (Beta prior), ties to the first listed.
- `thompson`: Beta-Bernoulli posteriors. pi(a) = P(a has the largest posterior
  draw), estimated with `monte_carlo_samples` joint draws each time the posterior
  changes, mixed with a floor (`min_propensity`) so every member keeps positive
  probability; the served member is then drawn from exactly that pi, so the logged
  propensity is the probability it was really served with.

Policies learn from labels through `update(member, success)`; until then they use
their priors. Pure Python + numpy: no Ray, no HTTP.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from serving.config import EpsilonGreedyPolicyConfig, PolicyConfig, PrimaryPolicyConfig, ThompsonPolicyConfig

__all__ = ["Decision", "Policy", "PrimaryPolicy", "EpsilonGreedyPolicy", "ThompsonPolicy", "make_policy"]


@dataclass(frozen=True)
class Decision:
    served: int  # member index chosen to serve
    propensities: tuple[float, ...]  # pi(a|x) for every member a
    greedy: int  # the member a greedy policy would have served

    @property
    def propensity(self) -> float:
        return self.propensities[self.served]


class Policy:
    """Base: Beta-Bernoulli reward statistics per member, shared by the learning policies."""

    kind = "base"

    def __init__(self, members: list[str], prior_alpha: float = 1.0, prior_beta: float = 1.0, seed: int | None = None):
        self.members = list(members)
        self._prior_alpha = np.full(len(members), prior_alpha, dtype=np.float64)
        self._prior_beta = np.full(len(members), prior_beta, dtype=np.float64)
        self.alpha = self._prior_alpha.copy()
        self.beta = self._prior_beta.copy()
        self.rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    @property
    def m(self) -> int:
        return len(self.members)

    def update(self, member: int, success: bool) -> None:
        """Fold in one observed reward for a member."""
        with self._lock:
            if success:
                self.alpha[member] += 1
            else:
                self.beta[member] += 1
            self._changed()

    def set_stats(self, successes: list[int], failures: list[int]) -> None:
        """Replace the observed rewards with totals from the recorder (prior + observed)."""
        with self._lock:
            self.alpha = self._prior_alpha + np.asarray(successes, dtype=np.float64)
            self.beta = self._prior_beta + np.asarray(failures, dtype=np.float64)
            self._changed()

    def _changed(self) -> None:
        """Hook: the posterior changed."""

    def greedy(self) -> int:
        mean = self.alpha / (self.alpha + self.beta)
        return int(np.argmax(mean))  # argmax takes the first of equals: ties go to the first listed member

    def propensities(self) -> np.ndarray:
        raise NotImplementedError

    def decide(self, n_rows: int) -> list[Decision]:
        """One decision per row, each sampled independently from the current propensities."""
        with self._lock:
            pi = self.propensities()
            greedy = self.greedy()
            served = self.rng.choice(self.m, size=n_rows, p=pi)
        props = tuple(float(x) for x in pi)
        return [Decision(int(s), props, greedy) for s in served]

    def fallback_order(self, decision: Decision) -> list[int]:
        """Members to serve instead, in order, when the chosen one fails: most probable first."""
        order = sorted(range(self.m), key=lambda a: (-decision.propensities[a], a))
        return [a for a in order if a != decision.served]


class PrimaryPolicy(Policy):
    kind = "primary"

    def __init__(self, members: list[str], primary: str):
        super().__init__(members)
        self.primary = members.index(primary)

    def propensities(self) -> np.ndarray:
        pi = np.zeros(self.m)
        pi[self.primary] = 1.0
        return pi

    def greedy(self) -> int:
        return self.primary

    def decide(self, n_rows: int) -> list[Decision]:
        d = Decision(self.primary, tuple(float(x) for x in self.propensities()), self.primary)
        return [d] * n_rows


class EpsilonGreedyPolicy(Policy):
    kind = "epsilon_greedy"

    def __init__(self, members: list[str], cfg: EpsilonGreedyPolicyConfig):
        super().__init__(members, cfg.prior_alpha, cfg.prior_beta, cfg.seed)
        self.epsilon = cfg.epsilon

    def propensities(self) -> np.ndarray:
        pi = np.full(self.m, self.epsilon / self.m)
        pi[self.greedy()] += 1.0 - self.epsilon
        return pi


class ThompsonPolicy(Policy):
    kind = "thompson"

    def __init__(self, members: list[str], cfg: ThompsonPolicyConfig):
        super().__init__(members, cfg.prior_alpha, cfg.prior_beta, cfg.seed)
        self.samples = cfg.monte_carlo_samples
        self.floor = cfg.min_propensity
        if self.floor * self.m >= 1:
            raise ValueError(f"min_propensity {self.floor} leaves nothing for {self.m} members")
        self._pi: np.ndarray | None = None

    def _changed(self) -> None:
        self._pi = None

    def propensities(self) -> np.ndarray:
        if self._pi is None:
            draws = self.rng.beta(self.alpha, self.beta, size=(self.samples, self.m))
            wins = np.bincount(draws.argmax(axis=1), minlength=self.m) / self.samples
            self._pi = (1 - self.floor * self.m) * wins + self.floor
        return self._pi


def make_policy(members: list[str], cfg: PolicyConfig) -> Policy:
    if isinstance(cfg, PrimaryPolicyConfig):
        if cfg.primary not in members:
            raise ValueError(f"policy.primary {cfg.primary!r} is not a served member ({', '.join(members)})")
        return PrimaryPolicy(members, cfg.primary)
    if isinstance(cfg, EpsilonGreedyPolicyConfig):
        return EpsilonGreedyPolicy(members, cfg)
    if isinstance(cfg, ThompsonPolicyConfig):
        return ThompsonPolicy(members, cfg)
    raise TypeError(f"unknown policy config {cfg!r}")
