"""Exploration (IPS/SNIPS/ESS/min propensity) and version-change metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry import ExplorationCounts, VersionChangeCounts, correctness


@st.composite
def logs(draw):
    m = draw(st.integers(2, 6))
    n = draw(st.integers(1, 40))
    c = draw(st.integers(1, 3))
    preds = [[draw(st.integers(-1, c - 1)) for _ in range(m)] for _ in range(n)]
    pis, served = [], []
    for i in range(n):
        raw = [draw(st.floats(0.05, 1.0)) for _ in range(m)]
        tot = sum(raw)
        pi = [r / tot for r in raw]
        s = draw(st.integers(0, m - 1))
        if preds[i][s] < 0:
            preds[i][s] = 0  # the served member produced an output
        pis.append(pi)
        served.append(s)
    rewards = [draw(st.sampled_from([0.0, 1.0, 0.5])) for _ in range(n)]
    greedy = [draw(st.integers(-1, m - 1)) for _ in range(n)]
    return m, c, preds, pis, served, rewards, greedy


def brute_ips(preds, pis, served, rewards, output_level):
    m = len(preds[0])
    res = {}
    for a in range(m):
        ws, wr, n = [], 0.0, 0
        for p, pi, s, r in zip(preds, pis, served, rewards):
            if p[a] < 0:
                continue
            n += 1
            if output_level:
                if p[a] != p[s]:
                    w = 0.0
                else:
                    w = 1.0 / sum(pi[b] for b in range(m) if p[b] == p[a])
            else:
                w = 1.0 / pi[s] if a == s else 0.0
            ws.append(w)
            wr += w * r
        sw, sw2 = sum(ws), sum(w * w for w in ws)
        res[a] = (wr / n if n else None, wr / sw if sw else None, sw * sw / sw2 if sw2 else None)
    return res


@settings(max_examples=100, deadline=None)
@pytest.mark.parametrize("output_level", [True, False])
@given(data=logs())
def test_ips_snips_ess_match_definitions_and_incremental(output_level, data):
    m, c, preds, pis, served, rewards, greedy = data
    names = [f"m{i}" for i in range(m)]
    P = np.array(preds)
    PI = np.array(pis)
    S = np.array(served)
    sp = PI[np.arange(len(S)), S]
    batch = ExplorationCounts.from_arrays(
        names, c, P, S, np.array(rewards), sp, PI if output_level else None, np.array(greedy)
    )
    inc = ExplorationCounts(tuple(names), c)
    for i in range(len(S)):
        inc.add(preds[i], served[i], rewards[i], sp[i], pis[i] if output_level else None, greedy[i])
    ref = brute_ips(preds, pis, served, rewards, output_level)
    for s in (batch.summary(), inc.summary()):
        for a, name in enumerate(names):
            got = s["members"][name]
            for key, want in zip(("ips", "snips", "effective_sample_size"), ref[a]):
                assert (got[key] is None and want is None) or math.isclose(got[key], want, rel_tol=1e-9, abs_tol=1e-12)
        assert s["min_propensity"] == pytest.approx(float(sp.min()))
        known = [g for g in greedy if g >= 0]
        explored = sum(1 for g, sv in zip(greedy, served) if g >= 0 and g != sv)
        assert s["exploration_rate"] == (explored / len(known) if known else None)
    assert np.array_equal(batch.served, inc.served)


def test_ips_recovers_true_accuracy_under_randomized_policy():
    """Ground-truth mode: with a known randomized policy, IPS/SNIPS estimate each member's
    accuracy from the served rewards alone (statistical check, fixed seed)."""
    rng = np.random.default_rng(7)
    n, m = 40_000, 3
    labels = rng.integers(0, 2, n)
    true_acc = np.array([0.9, 0.7, 0.55])
    preds = np.where(rng.random((n, m)) < true_acc, labels[:, None], 1 - labels[:, None])
    pi = np.array([0.6, 0.3, 0.1])
    served = rng.choice(m, size=n, p=pi)
    c = correctness(preds, labels)
    rewards = c[np.arange(n), served].astype(float)
    for full in (True, False):
        ex = ExplorationCounts.from_arrays(
            ["a", "b", "c"], 2, preds, served, rewards, pi[served], np.tile(pi, (n, 1)) if full else None
        ).summary()
        for k, name in enumerate("abc"):
            assert abs(ex["members"][name]["snips"] - true_acc[k]) < 0.03
            assert abs(ex["members"][name]["ips"] - true_acc[k]) < 0.05
    assert ex["min_propensity"] == pytest.approx(0.1)


def test_bad_propensities_are_rejected():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ExplorationCounts.from_arrays(["a", "b"], 2, np.zeros((2, 2)), np.array([0, 1]), np.ones(2), np.array([0.5, 0.0]))
    ex = ExplorationCounts(("a", "b"), 2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ex.add([0, 0], 0, 1.0, 1.5)


def test_bandit_correctness_known_only_where_output_matches_served():
    preds = np.array([[1, 1, 0], [0, 1, 1]])
    c = correctness(preds, served=np.array([0, 2]), rewards=np.array([1.0, 0.0]))
    assert c.tolist() == [[1, 1, -1], [-1, 0, 0]]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 1), st.integers(-1, 1), st.lists(st.integers(-1, 1), min_size=2, max_size=2)), max_size=50))
def test_version_change_matches_definition(rows):
    old = np.array([r[0] for r in rows], dtype=np.int64)
    new = np.array([r[1] for r in rows], dtype=np.int64)
    others = np.array([r[2] for r in rows], dtype=np.int64).reshape(len(rows), 2)
    batch = VersionChangeCounts.from_arrays(old, new, others)
    inc = VersionChangeCounts()
    for o, w, rest in rows:
        inc.add(o, w, rest)
    assert batch == inc
    valid = [r for r in rows if r[0] >= 0 and r[1] >= 0 and min(r[2]) >= 0]
    imp = [r for r in valid if r[0] == 0 and r[1] == 1]
    reg = [r for r in valid if r[0] == 1 and r[1] == 0]
    s = batch.summary()
    assert s["n"] == len(valid) and s["excluded"] == len(rows) - len(valid)
    assert s["negative_flip_rate"] == (len(reg) / len(valid) if valid else None)
    sys_imp = [r for r in imp if all(v == 0 for v in r[2])]
    assert s["improvement_on_systemic_failures"] == (len(sys_imp) / len(imp) if imp else None)
