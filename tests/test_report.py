"""`ecoserve report`: the page of a store filled by the real HTTP app (ONNX Runtime members, a
real recorder on SQLite) with the demo's ecosystems, candidates and a pipeline; its headline
numbers equal `ecoserve analyze` on the table it wrote; rendered in headless Chromium without a
console error, every plot a non-blank image of the stated size; bad input refused in one line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import chromium_binary, open_page
from conftest import local_app, serving_args
from test_risk_in_responses import post

from ecoserve.cli import main
from ecoserve.report import PLOT_SIZE
from models.heldout import load_heldout

LABEL_SHARE = 0.8  # of each ecosystem's rows, this share gets a label (the rest waits)


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo_store(serving_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, int]]:
    """A store with the demo's ecosystems served and partly labeled: (URL, rows sent per ecosystem)."""
    tmp = tmp_path_factory.mktemp("report")
    args = serving_args(serving_repo)
    args["ecosystems"] = {
        "digits": {"policy": {"kind": "primary", "primary": "mlp_a"}},
        "credit": {"policy": {"kind": "thompson", "seed": 0, "min_propensity": 0.05}, "candidates": {"gboost": "2"}},
        "diabetes": {"policy": {"kind": "epsilon_greedy", "epsilon": 0.2, "seed": 0}},
        "digits_chain": {"policy": {"kind": "primary", "primary": "chain"}, "candidates": {"chain": "2"}},
        "shop": {"policy": {"kind": "epsilon_greedy", "epsilon": 0.3, "seed": 0}, "position_shuffle_rate": 0.2},
    }
    url = f"sqlite:///{tmp / 'outcomes.db'}"
    args["telemetry"] = {"store_url": url}
    args["limits"] = {"max_rows_per_request": 1000, "max_body_bytes": 4_000_000}
    app, host = local_app(args)
    sent = {}
    try:
        for eco in args["ecosystems"]:
            held = load_heldout(serving_repo / eco)
            x = held.X.astype(np.float32)
            params: dict[str, Any] = {}
            if held.groups:
                params["subgroups"] = [{k: str(v[i]) for k, v in held.groups.items()} for i in range(len(x))]
            r = post(app, f"/v2/models/{eco}/infer", {"id": eco, "parameters": params, "inputs": [
                {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
            assert r.status_code == 200, r.text
            ids = r.json()["parameters"]["request_ids"]
            k = int(len(ids) * LABEL_SHARE)
            labels = [{"request_id": i, "label": float(v) if eco == "diabetes" else int(v)}
                      for i, v in zip(ids[:k], held.y[:k])]
            assert post(app, "/v2/feedback", {"labels": labels}).status_code == 200
            sent[eco] = len(ids)
        from test_candidates import value

        # the ranking ecosystem's systemic misses, as the recorder counts them
        sent["shop_misses"] = int(value(host, "ecoserve_systemic_failures_total", ecosystem="shop", source="observed",
                                        subgroup="all", subgroup_value="all") or 0)
    finally:
        host.close()
    return url, sent


@pytest.fixture(scope="module")
def report(demo_store: tuple[str, dict[str, int]], serving_repo: Path,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    url, _ = demo_store
    out = tmp_path_factory.mktemp("report-out")
    rc, stdout, err = _cli("report", "--store", url, "--repository", str(serving_repo), "--out", str(out))
    assert rc == 0, err
    assert stdout.strip() == f"report: {(out / 'index.html').resolve()}"
    assert "outcomes" in err and "#" in err  # the progress bar
    page = (out / "index.html").read_text()
    blob = re.search(r'<script type="application/json" id="ecoserve-report-data">(.*?)</script>', page, re.S)
    assert blob is not None
    return out, json.loads(blob.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))


def test_headline_numbers_equal_analyze_on_the_same_table(report: tuple[Path, dict[str, Any]],
                                                          demo_store: tuple[str, dict[str, int]]) -> None:
    out, data = report
    _, sent = demo_store
    assert set(data["ecosystems"]) == set(sent) - {"shop_misses"}
    page = (out / "index.html").read_text()
    # the ranking ecosystem: its clicks and systemic misses, as the recorder counted them
    shop = data["ecosystems"].pop("shop")
    assert shop["outcomes"] == sent["shop"] and shop["clicks"] == shop["labeled"] == int(sent["shop"] * LABEL_SHARE)
    assert shop["systemic_miss_rate"] == sent["shop_misses"] / shop["clicks"]
    assert data["plots"]["shop"] == ["ctr", "slots"]
    for eco, numbers in data["ecosystems"].items():
        args = numbers["analyze_args"]
        rc, stdout, err = _cli("analyze", str(out / args[0]), *args[1:])
        assert rc == 0, err
        want = json.loads(stdout)
        assert numbers["outcomes"] == want["n_outcomes"] == sent[eco]  # every row sent is in the store
        assert numbers["labeled"] == want["n"] == int(sent[eco] * LABEL_SHARE)
        assert numbers["systemic_failure_rate"] == want["systemic_failure_rate"]
        assert numbers["independent_systemic_failure_rate"] == want["independence_baseline"]["systemic_failure_rate"]
        band = want["intervals"]["systemic_failure_rate"]
        assert (numbers["systemic_failure_lower"], numbers["systemic_failure_upper"]) == (band["lower"], band["upper"])
        # and the sentence on the page shows them
        section = page[page.index(f'id="eco-{eco}"'):]
        assert f'data-metric="systemic_failure_rate">{want["systemic_failure_rate"] * 100:.1f}%<' in section
        assert f'data-metric="labeled">{want["n"]:,}<' in section
    # the candidate versions' flips are on the page where candidates ran
    assert "flips" in data["plots"]["credit"] and "flips" in data["plots"]["digits_chain"]
    assert "flips" not in data["plots"]["digits"]
    # the regression ecosystem is judged with its manifest's tolerance
    assert "--tolerance" in data["ecosystems"]["diabetes"]["analyze_args"]


def test_the_page_is_self_contained(report: tuple[Path, dict[str, Any]]) -> None:
    page = (report[0] / "index.html").read_text()
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page must not fetch anything"
    assert "<link" not in page
    assert page.count('class="plot"') == sum(len(v) for v in report[1]["plots"].values())


@pytest.mark.skipif(chromium_binary() is None,
                    reason="chromium is not installed (make test installs Debian's chromium package)")
def test_the_report_renders_in_headless_chromium(report: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, data = report
    with open_page((out / "index.html").resolve().as_uri()) as page:
        plots = page.evaluate("""(() => Array.from(document.querySelectorAll('img.plot')).map(img => {
            const c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            const g = c.getContext('2d');
            g.drawImage(img, 0, 0);
            const px = g.getImageData(0, 0, c.width, c.height).data;
            let ink = 0; const colours = new Set();
            for (let i = 0; i < px.length; i += 4 * 7) {
                if (px[i] < 235 || px[i + 1] < 235 || px[i + 2] < 235) ink++;
                colours.add((px[i] >> 4) * 256 + (px[i + 1] >> 4) * 16 + (px[i + 2] >> 4));
            }
            return {key: img.dataset.plot, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
                    ink: ink / (px.length / 4 / 7), colours: colours.size, shownWidth: img.clientWidth};
        }))()""")
        # ECOSERVE_REPORT_SCREENSHOT=PATH keeps the screenshot, to look at
        shot = Path(os.environ.get("ECOSERVE_REPORT_SCREENSHOT") or tmp_path / "report.png")
        width, height = page.screenshot(shot, 1000)
        errors = page.console_errors
    assert errors == [], errors
    assert len(plots) == sum(len(v) for v in data["plots"].values()) >= 20
    for p in plots:
        assert p["complete"] and (p["w"], p["h"]) == tuple(PLOT_SIZE), p
        assert p["ink"] > 0.02 and p["colours"] >= 4, f"a blank plot: {p}"
        assert 0 < p["shownWidth"] <= PLOT_SIZE[0]
    assert shot.stat().st_size > 100_000 and height > 10 * PLOT_SIZE[1]


def test_a_prediction_table_gets_a_page_too(serving_repo: Path, tmp_path: Path) -> None:
    rc, _, err = _cli("predictions", "credit", "--repository", str(serving_repo), "--out", str(tmp_path / "c.csv"))
    assert rc == 0, err
    rc, stdout, err = _cli("report", "--csv", str(tmp_path / "c.csv"), "--group-column", "sex",
                           "--group-column", "age_group", "--out", str(tmp_path / "r"))
    assert rc == 0, err
    page = (tmp_path / "r" / "index.html").read_text()
    rc, want, _ = _cli("analyze", str(tmp_path / "c.csv"), "--group-column", "sex", "--group-column", "age_group",
                       "--json")
    sfr = json.loads(want)["systemic_failure_rate"]
    assert f'data-metric="systemic_failure_rate">{sfr * 100:.1f}%<' in page
    assert page.count('class="plot"') >= 3


@pytest.mark.parametrize(("args", "message"), [
    ([], "give one of --store URL"),
    (["--store", "sqlite:///x.db", "--csv", "t.csv"], "give one of --store URL"),
    (["--store-env", "ECOSERVE_NO_SUCH_VAR"], "ECOSERVE_NO_SUCH_VAR is not set"),
    (["--csv", "/nonexistent.csv"], "no such file"),
    (["--store", "{store}", "--ecosystem", "nope"], "no outcomes of ecosystem 'nope' (it has: credit, diabetes"),
    (["--store", "{store}", "--ecosystem", "shop", "--repository", "/nonexistent"],
     "ranking ecosystem 'shop' needs its manifest"),
    (["--store", "{store}", "--since", "yesterday"], "not a time: 'yesterday'"),
    (["--store", "{store}", "--since", "2100-01-01"], "no outcome of 'credit' was predicted in the time range"),
    (["--store", "sqlite:///{empty}"], "holds no outcomes"),
    (["--store", "sqlite:////nonexistent-ecoserve/x.db"], "no such store file: /nonexistent-ecoserve/x.db"),
    (["--store", "{store}", "--out", "/proc/version/report"], "cannot write the report into /proc/version/report"),
    (["--store", "nosuchdb://x"], "store"),
])
def test_bad_input_is_one_line(args: list[str], message: str, demo_store: tuple[str, dict[str, int]],
                               tmp_path: Path) -> None:
    url = demo_store[0]
    args = [a.replace("{store}", url).replace("{empty}", str(tmp_path / "empty.db")) for a in args]
    if "{empty}" in " ".join(args) or "empty.db" in " ".join(args):  # an empty store: created, then read
        from telemetry.store import open_store

        open_store(f"sqlite:///{tmp_path / 'empty.db'}").close()
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    rc, _, err = _cli("report", *args, *out, "--quiet")
    assert rc == 2
    assert message in err and err.count("\n") == 1, err
