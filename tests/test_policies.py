"""Routing policies: served shares match the logged propensities; they learn from rewards."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from serving.config import EpsilonGreedyPolicyConfig, PrimaryPolicyConfig, ThompsonPolicyConfig
from serving.policies import make_policy

MEMBERS = ["a", "b", "c", "d"]


def _served_counts(policy, n):
    decisions = policy.decide(n)
    pis = {d.propensities for d in decisions}
    assert len(pis) == 1  # no update in between: one distribution for the whole batch
    for d in decisions:
        assert 0 < d.propensity <= 1
        assert abs(sum(d.propensities) - 1) < 1e-9
    return np.bincount([d.served for d in decisions], minlength=len(MEMBERS)), np.array(next(iter(pis)))


@pytest.mark.parametrize(
    "cfg",
    [
        EpsilonGreedyPolicyConfig(epsilon=0.3, seed=1),
        ThompsonPolicyConfig(seed=2, monte_carlo_samples=20_000),
    ],
)
def test_served_shares_match_logged_propensities(cfg):
    policy = make_policy(MEMBERS, cfg)
    # give the posteriors some shape first, so the propensities are not uniform
    for _ in range(30):
        policy.update(1, True)
        policy.update(2, False)
    counts, pi = _served_counts(policy, 20_000)
    keep = pi * 20_000 >= 5  # chi-square needs expected counts >= 5
    stat = chisquare(counts[keep], pi[keep] / pi[keep].sum() * counts[keep].sum())
    assert stat.pvalue > 0.001, (counts, pi)
    assert (counts[~keep] <= 5).all()


def test_primary_serves_only_the_primary():
    policy = make_policy(MEMBERS, PrimaryPolicyConfig(primary="c"))
    counts, pi = _served_counts(policy, 100)
    assert counts.tolist() == [0, 0, 100, 0] and pi.tolist() == [0, 0, 1.0, 0]
    assert policy.fallback_order(policy.decide(1)[0]) == [0, 1, 3]


def test_epsilon_greedy_follows_the_best_observed_reward():
    policy = make_policy(MEMBERS, EpsilonGreedyPolicyConfig(epsilon=0.2, seed=0))
    assert policy.greedy() == 0  # priors only: ties go to the first member
    for _ in range(10):
        policy.update(3, True)
        policy.update(0, False)
    d = policy.decide(1)[0]
    assert d.greedy == 3
    assert d.propensities[3] == pytest.approx(0.8 + 0.05)
    assert d.propensities[0] == pytest.approx(0.05)


def test_thompson_learns_and_keeps_positivity():
    policy = make_policy(MEMBERS, ThompsonPolicyConfig(seed=0, min_propensity=0.02))
    before = policy.decide(1)[0].propensities
    assert max(before) - min(before) < 0.05  # flat priors: about uniform
    for _ in range(200):
        policy.update(2, True)
        policy.update(1, False)
    after = policy.decide(1)[0].propensities
    assert after[2] > 0.9
    assert min(after) >= 0.02 - 1e-12


def test_seeded_policies_are_deterministic():
    a = make_policy(MEMBERS, ThompsonPolicyConfig(seed=5))
    b = make_policy(MEMBERS, ThompsonPolicyConfig(seed=5))
    assert [d.served for d in a.decide(50)] == [d.served for d in b.decide(50)]


def test_policy_config_errors():
    with pytest.raises(ValueError, match="not a served member"):
        make_policy(MEMBERS, PrimaryPolicyConfig(primary="zz"))
    with pytest.raises(ValueError, match="leaves nothing"):
        make_policy(["a", "b"], ThompsonPolicyConfig(min_propensity=0.5))
