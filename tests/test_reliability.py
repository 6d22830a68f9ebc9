"""`python -m bench reliability --quick`: every reliability scenario in its short form, on real
processes (soak, the store's PostgreSQL stopped, a full disk, SIGKILLs of each process, abuse,
fuzzing; bench/reliability.py says what each does). Every judged row must pass; the full run
writes docs/reliability.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import reliability

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("scenario", ["soak", "postgres_outage", "disk_full", "kills", "abuse", "fuzz"])
def test_scenario_short_form(scenario: str, model_repo: Path) -> None:
    rows = reliability.run(model_repo, quick=True, only=[scenario])
    assert rows
    failed = [f"{r.scenario}: {r.measured} (wanted: {r.criterion})" for r in rows if r.ok is False]
    assert not failed, failed
    skipped = [r for r in rows if r.ok is None and r.criterion == "-"]
    if skipped:  # a scenario that could not run here (no root for the tmpfs, no PostgreSQL binaries)
        if os.environ.get("CI"):
            pytest.fail(f"{scenario} must run in CI: {skipped[0].measured}")
        pytest.skip(skipped[0].measured)


def test_the_table_names_each_verdict() -> None:
    rows = [reliability.Row("a", "x | y", "c", True), reliability.Row("b", "m", "c", False),
            reliability.Row("c", "m", "-", None)]
    text = reliability.table(rows)
    assert text.splitlines()[2] == "| a | x / y | c | pass |"
    assert text.splitlines()[3].endswith("| FAIL |") and text.splitlines()[4].endswith("| not judged |")
