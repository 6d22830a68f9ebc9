"""Ecosystem telemetry: the metric core, outcome storage, the label join, and streaming metrics.

Never imports `serving` or Ray: everything here runs and tests without them.
"""

from telemetry.accumulator import CountsAccumulator
from telemetry.counts import OTHER, EcosystemCounts, EcosystemShape, correctness
from telemetry.exploration import ExplorationCounts
from telemetry.poisson_binomial import poisson_binomial_pmf
from telemetry.summary import DEFAULT_RASHOMON_EPSILON, kappa_matrix, summarize
from telemetry.version_change import VersionChangeCounts

__all__ = [
    "CountsAccumulator",
    "OTHER",
    "EcosystemCounts",
    "EcosystemShape",
    "ExplorationCounts",
    "VersionChangeCounts",
    "DEFAULT_RASHOMON_EPSILON",
    "correctness",
    "kappa_matrix",
    "poisson_binomial_pmf",
    "summarize",
]
