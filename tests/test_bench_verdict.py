"""The on/off bench's verdict: a bootstrap interval of the paired ratios' median against 0.95x."""

from __future__ import annotations

from bench.serving import paired_verdict


def test_clear_cost_free_and_clear_cost_and_noise():
    assert paired_verdict([1.0, 0.99, 1.02, 0.98, 1.01, 1.0, 0.97, 1.03, 1.0, 0.99]).endswith("met")
    assert paired_verdict([0.8, 0.82, 0.79, 0.85, 0.81, 0.83, 0.8, 0.84, 0.78, 0.82]).endswith("missed")
    # the spread this shared VM gives (an A/A control's rounds spanned 0.84x to 1.50x)
    assert paired_verdict([0.84, 1.2, 0.9, 1.1, 0.88, 1.05, 0.93, 1.15, 0.86, 1.0]).endswith("inconclusive")


def test_interval_contains_the_median_and_is_reproducible():
    paired = [0.9, 1.1, 0.95, 1.05, 1.0, 0.97, 1.02, 0.93, 1.08, 0.99]
    text = paired_verdict(paired)
    lo, hi = (float(v) for v in text.split(":")[0].split("-"))
    assert lo <= 0.995 <= hi and text == paired_verdict(paired)
