"""The project explains itself: the metric table in docs/metrics.md is what /metrics exports, the
README is a user's page, nothing points outside the repository, and imports point one way."""

from __future__ import annotations

import ast
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_recorder import SPEC, Clock, outcome

from telemetry.estimation import Estimate
from telemetry.metrics import exposition
from telemetry.recorder import EcosystemEstimates, LabelItem, Recorder
from telemetry.serving_stats import ServingStats
from telemetry.store import open_store

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _doc_table() -> dict[str, tuple[str, set[str]]]:
    rows = {}
    for line in (DOCS / "metrics.md").read_text().splitlines():
        m = re.match(r"^\| `(ecoserve_[a-z_]+)` \| (counter|gauge|histogram) \| ([^|]*) \|", line)
        if m:
            labels = {v.strip() for v in m.group(3).split(",")} - {"-", ""}
            rows[m.group(1)] = (m.group(2), labels)
    return rows


def _exported(tmp_path: Path) -> dict[str, tuple[str, set[str] | None]]:
    """What a recorder with outcomes, labels and a gateway's serving report exports: family name
    -> (type, label names of its samples; None when it has no sample)."""
    rec = Recorder({"eco": SPEC}, open_store(f"sqlite:///{tmp_path / 'o.db'}"), clock=Clock())
    try:
        rec.record([outcome(i, (0, 1, i % 2), rec.clock(), "female" if i % 3 else "male") for i in range(20)])
        rec.feedback([LabelItem(f"r{i}", "yes") for i in range(10)])
        # member a as a pipeline with a candidate that changes its stage s: candidate and pipeline families
        rec.record([replace(outcome(i, (0, 1, 1), rec.clock()), candidates=((0, "1", "2", 1, 0.9),),
                            stages=((0, 0, "s", "1", "ab", 0, 0.8), (0, 1, "s", "2", "cd", 1, 0.7)))
                    for i in range(20, 30)])
        rec.feedback([LabelItem(f"r{i}", "yes") for i in range(20, 30)])
        stats = ServingStats()
        stats.request("eco", 200)
        stats.observe("eco", "a", "cpu", 0.002)
        stats.error("eco", "b", "timeout")
        rec.record([], "gw", {"dropped": {"queue_full": 1}, "serving": stats.snapshot(), "progress": {}})
        # label-free estimates need hundreds of labels to fit (tests/test_estimation_streaming.py):
        # set a result here, to read the labels of their families
        e = Estimate(0.1, 0.05, 0.15, 10)
        rec.estimates["eco"] = EcosystemEstimates(version=1, fitted_at=1.0, n_fit=300, base_rate=0.1, n=10,
                                                  systemic={("all", "all"): e}, accuracy=[e, e, e], error=0.01,
                                                  checked=5)
        text = exposition(rec).decode()
    finally:
        rec.store.close()
    out: dict[str, tuple[str, set[str] | None]] = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + ("_total" if fam.type == "counter" else "")
        labels = None
        for s in fam.samples:
            labels = (labels or set()) | (set(s.labels) - {"le"})
        out[name] = (fam.type, labels)
    return out


def test_the_metric_table_in_the_docs_is_what_metrics_exports(tmp_path):
    doc, exported = _doc_table(), _exported(tmp_path)
    assert doc, "no metric table found in docs/metrics.md"
    assert set(doc) == set(exported), (set(doc) ^ set(exported))
    with_samples = 0
    for name, (kind, labels) in exported.items():
        assert doc[name][0] == kind, name
        if labels is not None:
            with_samples += 1
            assert doc[name][1] == labels, (name, doc[name][1], labels)
    assert with_samples >= 0.8 * len(exported)  # the labels of most families are checked on real samples


def test_every_doc_link_resolves():
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", text):
            assert (page.parent / target).is_file(), f"{page.name} links to {target}, which does not exist"
        for target, anchor in re.findall(r"\]\(([^)#\s]*\.md)#([^)]+)\)", text):
            linked = (page.parent / target).read_text()
            headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.+)$", linked, re.M)}
            ids = set(re.findall(r'<a id="([^"]+)"></a>', linked))
            assert anchor in headings | ids, f"{page.name} links to {target}#{anchor}, which is not there"


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [ROOT / p for p in out.splitlines() if (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every project file
        return [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts]


def test_the_readme_is_a_users_page_and_nothing_points_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "make demo" in readme and "make test" in readme
    history = re.compile(r"session [0-9]|[a-z]+th session|this session|earlier sessions|previous session", re.I)
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        assert not history.search(page.read_text()), (page.name, history.search(page.read_text()))
    outside = re.compile(r"\.\./shared|DESIGN\.md")
    for path in _tracked():
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".json", ".txt"} or path.name in {
                "Makefile", "Dockerfile"}:
            if path.name == "test_docs_and_layout.py":
                continue
            assert not outside.search(path.read_text(errors="replace")), path.relative_to(ROOT)


def _imports(package: str) -> dict[str, set[str]]:
    """module file -> the top-level names of what it imports (absolute imports)."""
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("serving", ("ecoserve",)),
    ("telemetry", ("serving", "ecoserve", "ray", "fastapi", "starlette")),
    ("models", ("serving", "telemetry", "ecoserve", "ray", "fastapi")),
])
def test_imports_point_one_way(package, forbidden):
    bad = {f: sorted(n for n in names if n.split(".")[0] in forbidden)
           for f, names in _imports(package).items()}
    assert not {f: n for f, n in bad.items() if n}


def test_no_module_writes_relative_to_its_own_file():
    """Generated files go where the caller says (the CLI passes the repository root)."""
    pattern = re.compile(r"__file__\)?\.(resolve\(\)\.)?parent\.parent")
    for package in ("serving", "telemetry", "models", "ecoserve"):
        for path in (ROOT / package).rglob("*.py"):
            assert not pattern.search(path.read_text()), path.relative_to(ROOT)


def test_a_unit_test_that_starts_ray_fails_loudly():
    import ray

    with pytest.raises(RuntimeError, match="started Ray: mark it `slow`"):
        ray.init()
