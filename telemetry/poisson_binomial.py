"""The independence baseline: the Poisson-binomial distribution of failures per instance.

If member m failed independently with probability e_m, the number of members
failing on an instance, k, would follow a Poisson-binomial distribution. Its pmf
comes from the O(M^2) recurrence (docs/design.md; Bommasani et al. 2023,
"Ecosystem-level analysis of deployed machine learning"):

    P_0 = [1];  P_j(k) = P_{j-1}(k) (1 - e_j) + P_{j-1}(k - 1) e_j
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["poisson_binomial_pmf"]


def poisson_binomial_pmf(error_rates: Sequence[float] | np.ndarray) -> np.ndarray:
    """pmf over k = 0..M of the number of failures among M independent members."""
    e = np.asarray(error_rates, dtype=np.float64)
    if e.ndim != 1:
        raise ValueError(f"error_rates must be one-dimensional, got shape {e.shape}")
    if np.any((e < 0) | (e > 1)) or not np.all(np.isfinite(e)):
        raise ValueError(f"error rates must lie in [0, 1], got {e.tolist()}")
    pmf = np.zeros(e.size + 1)
    pmf[0] = 1.0
    for j, p in enumerate(e, start=1):
        pmf[1 : j + 1] = pmf[1 : j + 1] * (1 - p) + pmf[0:j] * p
        pmf[0] *= 1 - p
    return pmf
