"""The vectorised metric core against plain-Python definitions, and incremental against batch."""

from __future__ import annotations

import numpy as np
import pytest
from brute import enumerate_independent, metrics
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry import CountsAccumulator, EcosystemCounts, EcosystemShape, correctness, poisson_binomial_pmf, summarize

GROUP_VALUES = ["a", "b", "zz"]  # "zz" is never declared: it must count as "other"


@st.composite
def ecosystems(draw):
    m = draw(st.integers(2, 10))
    n_classes = draw(st.integers(1, 4))
    n = draw(st.integers(0, 60))
    p_missing = draw(st.sampled_from([0.0, 0.1, 0.4]))
    p_unlabeled = draw(st.sampled_from([0.0, 0.2]))
    rows = []
    for _ in range(n):
        row = [
            -1 if draw(st.floats(0, 1)) < p_missing else draw(st.integers(0, n_classes - 1)) for _ in range(m)
        ]
        rows.append(row)
    labels = [-1 if draw(st.floats(0, 1)) < p_unlabeled else draw(st.integers(0, n_classes - 1)) for _ in range(n)]
    groups = [draw(st.sampled_from(GROUP_VALUES)) for _ in range(n)]
    groups2 = [draw(st.sampled_from(["x", "y"])) for _ in range(n)]
    compressed = draw(st.lists(st.booleans(), min_size=m, max_size=m))
    reference = draw(st.integers(0, m - 1))
    return m, n_classes, rows, labels, groups, groups2, compressed, reference


def _shape(m, n_classes, compressed=(), reference=0, subgroups=None, intersections=()):
    return EcosystemShape(
        members=tuple(f"m{i}" for i in range(m)),
        n_classes=n_classes,
        reference=reference,
        compressed=tuple(compressed),
        subgroups=subgroups or {},
        intersections=intersections,
    )


def _close(a, b):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) < 1e-9


def _check_against_brute(summary, ref):
    assert summary["n"] == ref["n"]
    assert summary["n_complete"] == ref["n_complete"]
    assert all(_close(x, y) for x, y in zip(summary["accuracy"].values(), ref["accuracy"]))
    if ref["sfr"] is None:
        assert summary["systemic_failure_rate"] is None
    else:
        assert _close(summary["systemic_failure_rate"], ref["sfr"])
        assert _close(summary["consistent_success_rate"], ref["csr"])
        base = summary["independence_baseline"]
        assert _close(base["systemic_failure_rate"], ref["base_sfr"])
        assert _close(base["consistent_success_rate"], ref["base_csr"])
        assert np.allclose(summary["failures_per_instance"]["observed"], ref["observed"])
        assert np.allclose(summary["failures_per_instance"]["independent"], ref["independent"])
        assert _close(summary["homogeneity_excess"]["systemic_failure_rate"], ref["sfr"] - ref["base_sfr"])
    assert summary["n_predicted"] == ref["n_predicted"]
    if ref["n_predicted"]:
        names = summary["members"]
        for a, ma in enumerate(names):
            for b, mb in enumerate(names):
                assert _close(summary["agreement"][ma][mb], ref["agreement"][a][b])
                assert _close(summary["kappa"][ma][mb], ref["kappa"][a][b])
        assert _close(summary["unanimity_rate"], ref["unanimity"])
        assert _close(summary["ambiguity"], ref["ambiguity"])
        assert _close(summary["discrepancy"], ref["discrepancy"])
        if "cie_rate" in ref:
            assert _close(summary["cie_rate"], ref["cie_rate"])
    else:
        assert summary["unanimity_rate"] is None and summary["ambiguity"] is None


@settings(max_examples=150, deadline=None)
@given(ecosystems())
def test_batch_metrics_match_plain_python_definitions(eco):
    m, n_classes, rows, labels, groups, groups2, compressed, reference = eco
    shape = _shape(m, n_classes, compressed, reference, {"g": ("a", "b"), "h": ("x", "y")}, (("g", "h"),))
    preds = np.array(rows, dtype=np.int64).reshape(len(rows), m)
    y = np.array(labels, dtype=np.int64)
    counts = EcosystemCounts.from_arrays(shape, preds, correctness(preds, y), {"g": groups, "h": groups2})
    summary = summarize(counts)
    _check_against_brute(summary, metrics(rows, labels, n_classes, reference, compressed))
    # per subgroup: the same quantities computed inside the group, undeclared values as "other"
    for value in ("a", "b", "other"):
        sel = [i for i, g in enumerate(groups) if (g if g in ("a", "b") else "other") == value]
        if not sel:
            assert value not in summary["groups"]["g"]
            continue
        ref = metrics([rows[i] for i in sel], [labels[i] for i in sel], n_classes, reference, compressed)
        _check_against_brute(summary["groups"]["g"][value], ref)
    for key, sub in summary["groups"]["g&h"].items():
        gv, hv = key.split("&")
        sel = [i for i in range(len(rows)) if (groups[i] if groups[i] in ("a", "b") else "other") == gv and groups2[i] == hv]
        ref = metrics([rows[i] for i in sel], [labels[i] for i in sel], n_classes, reference, compressed)
        _check_against_brute(sub, ref)


@settings(max_examples=150, deadline=None)
@given(ecosystems())
def test_incremental_equals_batch(eco):
    m, n_classes, rows, labels, groups, groups2, compressed, reference = eco
    shape = _shape(m, n_classes, compressed, reference, {"g": ("a", "b"), "h": ("x", "y")}, (("g", "h"),))
    preds = np.array(rows, dtype=np.int64).reshape(len(rows), m)
    c = correctness(preds, np.array(labels, dtype=np.int64))
    batch = EcosystemCounts.from_arrays(shape, preds, c, {"g": groups, "h": groups2})
    acc = CountsAccumulator(shape)
    for i in range(len(rows)):
        acc.add(rows[i], c[i].tolist(), {"g": groups[i], "h": groups2[i]})
    inc = acc.snapshot()
    assert inc.equals(batch)
    assert summarize(inc) == summarize(batch)
    # shards add up: two halves summed equal the whole
    half = len(rows) // 2
    left = EcosystemCounts.from_arrays(shape, preds[:half], c[:half], {"g": groups[:half], "h": groups2[:half]})
    right = EcosystemCounts.from_arrays(shape, preds[half:], c[half:], {"g": groups[half:], "h": groups2[half:]})
    assert (left + right).equals(batch)
    # the streaming recorder's split: predictions counted when recorded, labels (alone) when they
    # arrive; together exactly the counts of both at once
    grp = {"g": groups, "h": groups2}
    split = EcosystemCounts.from_arrays(shape, preds, None, grp) + EcosystemCounts.from_arrays(
        shape, preds, c, grp, labels_only=True)
    assert split.equals(batch)


@pytest.mark.parametrize("m", [2, 3, 5, 10])
def test_all_correct_and_all_wrong(m):
    n = 20
    labels = np.arange(n) % 3
    shape = _shape(m, 3)
    right = np.repeat(labels[:, None], m, axis=1)
    s = summarize(EcosystemCounts.from_arrays(shape, right, correctness(right, labels)))
    assert s["systemic_failure_rate"] == 0.0 and s["consistent_success_rate"] == 1.0
    assert s["independence_baseline"]["consistent_success_rate"] == 1.0
    assert s["unanimity_rate"] == 1.0 and s["ambiguity"] == 0.0
    wrong = (right + 1) % 3
    s = summarize(EcosystemCounts.from_arrays(shape, wrong, correctness(wrong, labels)))
    assert s["systemic_failure_rate"] == 1.0 and s["consistent_success_rate"] == 0.0
    assert s["independence_baseline"]["systemic_failure_rate"] == 1.0
    assert s["homogeneity_ratio"]["systemic_failure_rate"] == 1.0


def test_missing_outputs_are_excluded_not_failures():
    shape = _shape(3, 2)
    preds = np.array([[0, 0, -1], [1, 1, 1], [0, 1, 0]])
    labels = np.array([1, 1, 0])
    s = summarize(EcosystemCounts.from_arrays(shape, preds, correctness(preds, labels)))
    # row 0 would be a systemic failure if the missing output counted as a failure
    assert s["n"] == 3 and s["n_complete"] == 2 and s["n_incomplete"] == 1
    assert s["systemic_failure_rate"] == 0.0
    assert s["accuracy"] == {"m0": 2 / 3, "m1": 1 / 3, "m2": 1.0}  # m2 over its 2 outputs


def test_empty_input_gives_none_not_zero():
    s = summarize(EcosystemCounts.from_arrays(_shape(3, 2), np.zeros((0, 3), dtype=np.int64), np.zeros((0, 3))))
    assert s["n"] == 0 and s["systemic_failure_rate"] is None and s["unanimity_rate"] is None
    assert s["accuracy"] == {"m0": None, "m1": None, "m2": None}


def test_single_class_kappa_is_undefined():
    shape = _shape(2, 2)
    preds = np.zeros((5, 2), dtype=np.int64)
    s = summarize(EcosystemCounts.from_arrays(shape, preds))
    assert s["agreement"]["m0"]["m1"] == 1.0
    assert s["kappa"]["m0"]["m1"] is None


def test_bad_shapes_are_rejected():
    shape = _shape(3, 2)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        EcosystemCounts.from_arrays(shape, np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="out of range"):
        EcosystemCounts.from_arrays(shape, np.full((4, 3), 5))
    with pytest.raises(ValueError, match="at least 2 members"):
        EcosystemShape(members=("a",), n_classes=2)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=10))
def test_poisson_binomial_sums_to_one_and_matches_enumeration(err):
    pmf = poisson_binomial_pmf(err)
    assert pmf.shape == (len(err) + 1,)
    assert abs(pmf.sum() - 1) < 1e-9
    assert np.allclose(pmf, enumerate_independent(err), atol=1e-12)
    assert np.all(pmf >= -1e-15)


def test_poisson_binomial_rejects_bad_rates():
    with pytest.raises(ValueError, match="lie in"):
        poisson_binomial_pmf([0.5, 1.5])
