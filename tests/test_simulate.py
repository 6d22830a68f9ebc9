"""`ecoserve simulate`: a ranking ecosystem's feedback loop, closed with synthetic users of known
preferences through ecoserve's own app, data plane, ONNX Runtime members, recorder and store.
Fixed seed, stated thresholds: without exploration the catalogue narrows (coverage falls by at
least 40%) and the shown items get more popular (ARP rises); with exploration coverage holds (at
least 90% every round); each member's off-policy estimate covers its true click-through."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecoserve.cli import main
from ecoserve.simulate import SimulationConfig, simulate

ROUNDS, USERS = 6, 1000


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, list]:
    tmp = tmp_path_factory.mktemp("simulate")
    return {expl: simulate(SimulationConfig(rounds=ROUNDS, users=USERS, exploration=expl, seed=0),
                           tmp / str(expl), progress=False) for expl in (False, True)}


def test_without_exploration_the_catalogue_narrows(runs: dict[bool, list]) -> None:
    off = runs[False]
    first, last = off[0], off[-1]
    assert last.coverage <= 0.6 * first.coverage, [r.coverage for r in off]
    assert last.arp > first.arp and sum(r.arp for r in off[-3:]) / 3 > first.arp, [r.arp for r in off]
    assert last.gini > first.gini


def test_with_exploration_coverage_holds(runs: dict[bool, list]) -> None:
    on, off = runs[True], runs[False]
    assert all(r.coverage >= 0.9 for r in on), [r.coverage for r in on]
    assert on[-1].coverage - off[-1].coverage >= 0.3
    assert on[-1].arp < off[-1].arp  # the explored lists are less popularity-bound


def test_off_policy_estimates_cover_the_true_click_through(runs: dict[bool, list]) -> None:
    pairs = [(r.round, name, v) for run in runs.values() for r in run for name, v in r.members.items()
             if v["snips"] is not None]
    assert len(pairs) >= ROUNDS * 4  # every member has an estimate with exploration on
    missed = [(rnd, name, v) for rnd, name, v in pairs if not v["lower"] <= v["true"] <= v["upper"]]
    # 95% intervals: a few misses are expected; more than 10% would mean a biased estimator
    assert len(missed) <= 0.1 * len(pairs), missed
    # the explorer (random lists) is estimated far below the trained members, as it truly is
    on = runs[True][-1].members
    assert on["explorer"]["upper"] < on["logreg"]["lower"]


def test_the_command_prints_plots_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--rounds", "2", "--users", "200", "--exploration", "on", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "exploration on: 2 rounds of 200 users" in out and "true CTR / SNIPS" in out
    assert (tmp_path / "rounds.png").stat().st_size > 20_000 and (tmp_path / "rounds.json").is_file()
    assert main(["simulate", "--rounds", "0", "--out", str(tmp_path)]) == 2
    assert main(["simulate", "--epsilon", "0", "--out", str(tmp_path)]) == 2
    assert main(["simulate", "--out", "/proc/version/sim"]) == 2
    assert "cannot use /proc/version/sim as the work folder" in capsys.readouterr().err
