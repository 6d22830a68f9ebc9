"""Benchmarks (`make bench`): measured figures next to baselines measured in the same run."""
