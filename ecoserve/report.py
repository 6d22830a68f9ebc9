"""`ecoserve report`: one self-contained HTML page per run, the ecosystem's findings as plots.

Reads the outcome store (or a prediction table, `--csv`), writes `DIR/index.html` with every plot
embedded as a PNG (nothing to fetch: it opens offline, in a mail attachment, on a laptop), and,
for a store, one prediction table per ecosystem (`DIR/<ecosystem>.csv`) with the exact
`ecoserve analyze` command that reproduces the page's numbers from it.

The numbers come from `telemetry.analysis.analyze_csv` on that table (the same definitions as the
live metrics, docs/design.md), so the page, `ecoserve analyze` and an auditor's own script agree.
The store-only parts (label delays, coverage by age, the audit lists' request ids, the fitted
label-free estimator's estimates) are read from the same outcomes. Labels: each outcome's
current label (corrections applied); the live counters count first labels.

Plots: matplotlib (Agg), the Okabe-Ito colour-blind-safe palette, cividis for heatmaps, every
axis labelled with its unit.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from telemetry.analysis import AnalysisError, AnalysisOptions, analyze_csv

__all__ = ["ReportError", "EcosystemTable", "table_from_store", "write_report", "check_output", "parse_time",
           "PLOT_SIZE"]

# Okabe & Ito (2008): distinguishable with every common colour-vision deficiency
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
PLOT_SIZE = (880, 360)  # every plot's size in pixels (width, height): the page's layout relies on it
_DPI = 100
SMALL_GROUP = 30  # a subgroup with fewer labeled outcomes is marked small (its interval is wide)
AUDIT_ROWS = 20  # request ids listed per audit list on the page (the CSV has them all)
COVERAGE_AGES_S = (0.0, 60.0, 600.0, 3600.0, 86400.0)


class ReportError(ValueError):
    """The report cannot be written; one line saying why."""


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 date or time (UTC unless it says otherwise)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ReportError(f"not a time: {text!r} (give unix seconds or an ISO 8601 date, e.g. 2026-12-01T08:00)") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@dataclass
class EcosystemTable:
    """One ecosystem's outcomes as a prediction table plus what only the store knows."""

    name: str
    members: list[str]
    rows: list[dict[str, str]]  # the CSV's rows
    columns: list[str]
    analyze: AnalysisOptions
    analyze_args: list[str]  # `ecoserve analyze` arguments after the file
    created_at: np.ndarray = field(default_factory=lambda: np.zeros(0))
    label_delay_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # first label's delay, labeled rows
    estimated: dict[str, Any] | None = None  # the fitted label-free estimator on the unlabeled outcomes
    read_at: float = 0.0
    ranking: Any = None  # a ranking ecosystem: its counts (telemetry.ranking.RankingCounts), items, misses


class _Progress:
    """A progress bar on stderr for long reads (a line per 10% where stderr is not a terminal)."""

    def __init__(self, total: int, what: str, enabled: bool = True) -> None:
        self.total, self.what, self.done, self.enabled = max(total, 1), what, 0, enabled and total > 0
        self.tty = sys.stderr.isatty()
        self._last = -1

    def add(self, n: int) -> None:
        if not self.enabled:
            return
        self.done += n
        frac = min(1.0, self.done / self.total)
        step = int(frac * 10)
        if not self.tty and step == self._last:
            return
        self._last = step
        bar = "#" * int(frac * 30)
        end = "\n" if (not self.tty or frac >= 1.0) else ""
        sys.stderr.write(f"\r{self.what}: [{bar:<30}] {self.done:,}/{self.total:,} outcomes{end}")
        sys.stderr.flush()


def _manifest(repository: Path | None, name: str) -> Any:
    from models.manifest import MANIFEST_NAME, ManifestError, load_manifest

    if repository is None or not (repository / name / MANIFEST_NAME).is_file():
        return None
    try:
        return load_manifest(repository / name)
    except ManifestError as exc:
        raise ReportError(str(exc).splitlines()[0]) from exc


def _ecosystems(store: Any) -> list[str]:
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT DISTINCT ecosystem FROM ecoserve_outcomes ORDER BY ecosystem"))]


def table_from_store(url: str, ecosystems: Sequence[str] | None, since: float | None, until: float | None,
                     repository: Path | None, progress: bool = True) -> list[EcosystemTable]:
    """Every outcome of the ecosystems predicted in [since, until) as prediction tables."""
    from sqlalchemy.engine import make_url

    from telemetry.store import StoreError, open_store

    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy's ArgumentError: not a URL at all
        raise ReportError(f"not a store URL: {url!r}") from exc
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:" \
            and not Path(parsed.database).is_file():
        raise ReportError(f"no such store file: {parsed.database} (the report reads a store; it does not create one)")
    try:
        store = open_store(url)
    except StoreError as exc:
        raise ReportError(str(exc)) from exc
    try:
        names = list(ecosystems) if ecosystems else _ecosystems(store)
        if not names:
            raise ReportError(f"the store {url} holds no outcomes")
        estimators = store.latest_estimators()
        tables = []
        for name in names:
            total = store.count_outcomes(name)
            if total == 0:
                raise ReportError(f"the store holds no outcomes of ecosystem {name!r} "
                                  f"(it has: {', '.join(_ecosystems(store)) or 'none'})")
            bar = _Progress(total, f"reading {name}", progress)
            outcomes = []
            for batch in store.iter_outcomes(name):
                bar.add(len(batch))
                outcomes += [o for o in batch if (since is None or o.created_at >= since)
                             and (until is None or o.created_at < until)]
            if not outcomes:
                raise ReportError(f"no outcome of {name!r} was predicted in the time range asked for")
            tables.append(_table(name, outcomes, _manifest(repository, name), estimators.get(name)))
        return tables
    finally:
        store.close()


def _ranking_table(name: str, outcomes: list[Any], manifest: Any) -> EcosystemTable:
    """A ranking ecosystem: its lists and clicks (current labels) counted by `telemetry.ranking`,
    and a table of one row per outcome (the served list, each member's list, the label)."""
    from telemetry.ranking import RankingCounts, ranking_correctness
    from telemetry.spec import EcosystemSpec

    items = list(manifest.classes)
    members = list(outcomes[-1].members)
    k = manifest.ranking.k
    labels = np.array([np.nan if o.label is None else o.label for o in outcomes], dtype=np.float64)
    counts = RankingCounts.of_stored(tuple(members), len(items), k, outcomes, labels)
    spec = EcosystemSpec(name=name, members=tuple(members), classes=manifest.label_classes, task="ranking", k=k)
    correct = ranking_correctness(spec, [o.members for o in outcomes], [o.rankings for o in outcomes], labels)
    known = (correct >= 0).all(axis=1)
    miss = known & (correct == 0).all(axis=1)

    def names(ids: Any) -> str:
        return " ".join(items[int(i)] for i in ids) if ids is not None else ""

    rows = []
    for o, lab in zip(outcomes, labels.tolist()):
        label = "" if lab != lab else (items[int(lab)] if int(lab) < len(items) else manifest.ranking.no_click)
        own = dict(zip(o.members, o.rankings or []))
        rows.append({"request_id": o.request_id, "label": label,
                     "served": o.members[o.served] if 0 <= o.served < len(o.members) else "",
                     "shown": names(o.shown[0]) if o.shown else "", **{m: names(own.get(m)) for m in members}})
    audit = [[rows[i]["request_id"], rows[i]["label"], *(rows[i][m] for m in members)]
             for i in np.flatnonzero(miss)[::-1][:AUDIT_ROWS]]
    table = EcosystemTable(name, members, rows, ["request_id", "label", "served", "shown", *members],
                           AnalysisOptions(), [], np.array([o.created_at for o in outcomes]),
                           np.maximum(np.array([o.counted_time - o.created_at for o in outcomes
                                                if o.counted_time is not None]), 0.0), read_at=time.time())
    table.ranking = {"counts": counts, "clicks": int(known.sum()), "misses": int(miss.sum()), "audit": audit,
                     "labeled": int((~np.isnan(labels)).sum()), "k": k}
    return table


def _table(name: str, outcomes: list[Any], manifest: Any, estimator: str | None) -> EcosystemTable:
    outcomes.sort(key=lambda o: o.created_at)
    if manifest is not None and manifest.task == "ranking":
        return _ranking_table(name, outcomes, manifest)
    if manifest is None and any(o.rankings for o in outcomes[-100:]):
        raise ReportError(f"ranking ecosystem {name!r} needs its manifest (the catalogue and k): give "
                          "--repository, or leave it out with --ecosystem")
    members = list(dict.fromkeys(m for o in outcomes for m in o.members))
    latest = list(outcomes[-1].members)
    members = latest + [m for m in members if m not in latest]
    regression = manifest is not None and manifest.task == "regression"
    classes = list(manifest.classes) if manifest is not None and not regression else None

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v) or (not regression and v < 0):
            return ""
        if regression:
            return repr(float(v))
        return classes[int(v)] if classes and 0 <= int(v) < len(classes) else str(int(v))

    groups = sorted({k for o in outcomes for k in o.groups})
    if manifest is not None:
        groups = [g for g in manifest.subgroups] + [g for g in groups if g not in manifest.subgroups]
    cand_cols: dict[tuple[str, str, str], str] = {}
    rows = []
    for o in outcomes:
        row = {"request_id": o.request_id, "label": "" if o.label is None else cell(o.label)}
        own = dict(zip(o.members, o.predictions))
        for m in members:
            row[m] = cell(own.get(m))
        for g in groups:
            row[g] = o.groups.get(g, "")
        row["served"] = o.members[o.served] if 0 <= o.served < len(o.members) else ""
        row["propensity"] = repr(float(o.propensities[o.intended])) if o.propensities else ""
        for a, current, version, out, *_ in o.candidates or ():
            if 0 <= a < len(o.members):
                col = cand_cols.setdefault((o.members[a], str(current), str(version)), f"{o.members[a]}@{version}")
                row[col] = cell(out)
        rows.append(row)
    served_cols = ["served", "propensity"]
    # exploration only where the policy randomized (a constant policy has nothing to estimate)
    # (outcomes from outside name no served member: no exploration to estimate)
    props = {r["propensity"] for r in rows}
    explores = all(r["served"] for r in rows) and any(p not in ("", "1.0") for p in props)
    columns = ["request_id", "label", *members, *groups, *served_cols, *sorted(set(cand_cols.values()))]
    compressed = tuple(m.name for m in manifest.current_members() if m.compressed and m.name in members) \
        if manifest is not None else ()
    versions = tuple((member, member, col) for (member, _cur, _v), col in sorted(cand_cols.items()))
    versions = tuple(dict.fromkeys(versions))
    kw: dict[str, Any] = {"members": tuple(members), "group_columns": tuple(groups), "compressed": compressed,
                          "versions": versions}
    args = ["--members", ",".join(members)]
    for g in groups:
        args += ["--group-column", g]
    if explores:
        kw |= {"served_column": "served", "propensity_column": "propensity"}
        args += ["--served-column", "served", "--propensity-column", "propensity"]
    if compressed:
        args += ["--compressed", ",".join(compressed)]
    for member, old, new in versions:
        args += ["--versions", f"{member}={old},{new}"]
    if regression:
        spec = manifest.regression
        kw |= {"tolerance": spec.tolerance, "value_range": tuple(spec.range), "bin_width": spec.bin_width}
        args += ["--tolerance", repr(spec.tolerance), "--range", f"{spec.range[0]!r},{spec.range[1]!r}"]
        if spec.bin_width is not None:
            args += ["--bin-width", repr(spec.bin_width)]
    created = np.array([o.created_at for o in outcomes])
    delays = np.array([o.counted_time - o.created_at for o in outcomes if o.counted_time is not None])
    table = EcosystemTable(name, members, rows, columns, AnalysisOptions(**kw), args, created,
                           np.maximum(delays, 0.0), read_at=time.time())
    if estimator is not None and not regression:
        table.estimated = _estimates(estimator, outcomes, members)
    return table


def _estimates(text: str, outcomes: list[Any], members: list[str]) -> dict[str, Any] | None:
    """The store's fitted label-free estimator applied to the outcomes still waiting for a label."""
    from telemetry.estimation import SystemicEstimator

    try:
        est = SystemicEstimator.from_json(text)
    except (ValueError, KeyError, TypeError):
        return None
    waiting = [o for o in outcomes if o.label is None and tuple(o.members) == est.members]
    if not waiting:
        return None
    preds = np.array([o.predictions for o in waiting], dtype=np.int64)
    scores = np.array([[np.nan if s is None else s for s in (o.scores or [None] * len(o.members))] for o in waiting],
                      dtype=np.float64)
    served = np.array([o.served for o in waiting], dtype=np.int64)
    sums = est.sums(preds, scores, served)
    sfr = est.finish(sums)
    return {"n": len(waiting), "reference_n": est.n_fit, "systemic_failure_rate": sfr.value if sfr.n else None,
            "lower": sfr.lower, "upper": sfr.upper,
            "accuracy": {m: (a.value, a.lower, a.upper) for m, a in zip(est.members, est.finish_accuracy(sums)) if a.n}}


# ---------------------------------------------------------------- plots
def _figure(ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    plt.rcParams.update({"font.size": 10, "axes.prop_cycle": cycler(color=PALETTE),
                         "axes.spines.top": False, "axes.spines.right": False})
    fig, axes = plt.subplots(1, ncols, figsize=(PLOT_SIZE[0] / _DPI, PLOT_SIZE[1] / _DPI), dpi=_DPI)
    return fig, axes


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=_DPI)  # no bbox "tight": every image has PLOT_SIZE exactly
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 100:.{digits}f}%"


def _failures_plot(r: dict[str, Any]) -> str:
    fig, ax = _figure()
    obs, ind = r["failures_per_instance"]["observed"], r["failures_per_instance"]["independent"]
    k = np.arange(len(obs))
    ax.bar(k - 0.2, obs, 0.4, label="observed", color=PALETTE[0])
    ax.bar(k + 0.2, ind, 0.4, label="if members failed independently", color=PALETTE[1], hatch="//",
           edgecolor="white")
    ax.set_xticks(k)
    ax.set_xlabel("members wrong on the instance (count)")
    ax.set_ylabel("share of labeled instances (%)")
    ax.yaxis.set_major_formatter(_percent_formatter())
    ax.set_title("Failures per instance: observed vs independent members")
    ax.legend(frameon=False)
    return _png(fig)


def _percent_formatter() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=0)


def _group_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    from telemetry.estimation import wilson

    out = []
    for attr, values in (r.get("groups") or {}).items():
        for value, g in values.items():
            n = int(g.get("n_complete") or 0)
            sfr = g.get("systemic_failure_rate")
            lo, hi = wilson(round(sfr * n), n) if sfr is not None and n else (None, None)
            base = (g.get("independence_baseline") or {}).get("systemic_failure_rate")
            out.append({"group": f"{attr}={value}", "n": n, "rate": sfr, "lower": lo, "upper": hi, "baseline": base,
                        "excess": None if sfr is None or base is None else sfr - base, "small": n < SMALL_GROUP})
    return sorted(out, key=lambda x: -1 if x["rate"] is None else x["rate"], reverse=True)


def _subgroup_plot(rows: list[dict[str, Any]]) -> str:
    fig, ax = _figure()
    rows = [x for x in rows if x["rate"] is not None][:16]
    y = np.arange(len(rows))[::-1]
    for yi, x in zip(y, rows):
        colour = PALETTE[5] if x["small"] else PALETTE[0]
        ax.errorbar(x["rate"], yi, xerr=[[x["rate"] - x["lower"]], [x["upper"] - x["rate"]]], fmt="o", color=colour,
                    capsize=3, mfc="white" if x["small"] else colour)
        if x["baseline"] is not None:
            ax.plot(x["baseline"], yi, marker="|", markersize=14, color=PALETTE[1], mew=2)
    from matplotlib.lines import Line2D

    ax.set_yticks(y)
    ax.set_yticklabels([f"{x['group']} (n={x['n']}{', small' if x['small'] else ''})" for x in rows])
    ax.set_xlabel("systemic failure rate (%)")
    ax.xaxis.set_major_formatter(_percent_formatter())
    ax.set_title("Subgroups and intersections, sorted")
    ax.legend(handles=[
        Line2D([], [], color=PALETTE[0], marker="o", label="observed, 95% interval"),
        Line2D([], [], color=PALETTE[5], marker="o", mfc="white", label=f"fewer than {SMALL_GROUP} labeled"),
        Line2D([], [], color=PALETTE[1], marker="|", markersize=12, mew=2, ls="", label="if members failed independently"),
    ], frameon=False, fontsize=8, loc="lower right")
    return _png(fig)


def _agreement_plot(r: dict[str, Any], members: list[str]) -> str:
    fig, (ax, bx) = _figure(2)
    kappa = np.array([[r["kappa"][a][b] if r["kappa"][a][b] is not None else np.nan for b in members]
                      for a in members], dtype=float)
    im = ax.imshow(kappa, cmap="cividis", vmin=min(0.0, float(np.nanmin(kappa))), vmax=1.0)
    ax.set_xticks(range(len(members)), members, rotation=45, ha="right")
    ax.set_yticks(range(len(members)), members)
    for i in range(len(members)):
        for j in range(len(members)):
            if np.isfinite(kappa[i, j]):
                ax.text(j, i, f"{kappa[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if kappa[i, j] > 0.6 else "white")
    ax.set_title("Pairwise Cohen's kappa (1 = always agree)")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, label="kappa (unitless)")
    acc = [r["accuracy"].get(m) for m in members]
    band = r["intervals"]["accuracy"]
    y = np.arange(len(members))[::-1]
    for yi, m, v in zip(y, members, acc):
        if v is None:
            continue
        b = band.get(m) or {"lower": v, "upper": v}
        bx.errorbar(v, yi, xerr=[[v - b["lower"]], [b["upper"] - v]], fmt="o", color=PALETTE[2], capsize=3)
    bx.set_yticks(y, members)
    bx.set_xlabel("accuracy on labeled outcomes (%), 95% interval")
    bx.xaxis.set_major_formatter(_percent_formatter())
    bx.set_title("Each member's accuracy")
    return _png(fig)


def _distinct_answers(table: EcosystemTable) -> np.ndarray:
    """Instances by how many distinct answers the members gave (index = k; k = 0: no output)."""
    counts = np.zeros(len(table.members) + 1, dtype=np.int64)
    for row in table.rows:
        vals = {row[m] for m in table.members if row[m] != ""}
        counts[len(vals)] += 1
    return counts


def _multiplicity_plot(counts: np.ndarray) -> str:
    fig, ax = _figure()
    k = np.arange(1, len(counts))
    share = counts[1:] / max(1, counts[1:].sum())
    ax.bar(k, share, color=PALETTE[3])
    _labelled_shares(ax, list(k), [float(v) for v in share], "distinct answers the members gave on the instance "
                     "(count)", "share of instances (%)", "Per-instance disagreement (1 = unanimous)")
    ax.set_xticks(k)
    return _png(fig)


def _labelled_shares(ax: Any, x: list[Any], shares: list[float], xlabel: str, ylabel: str, title: str) -> None:
    """Each bar's share printed on it ("none yet" for NaN), a percent axis, the labels and title."""
    for xi, v in zip(x, shares):
        ax.text(xi, 0 if math.isnan(v) else v, "none yet" if math.isnan(v) else _pct(v), ha="center", va="bottom",
                fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_formatter(_percent_formatter())
    ax.set_title(title)


def _labels_plot(table: EcosystemTable) -> str:
    fig, (ax, bx) = _figure(2)
    d = table.label_delay_s
    log_scale = False
    if d.size:
        lo = max(1e-3, float(d[d > 0].min()) if (d > 0).any() else 1e-3)
        log_scale = float(d.max()) / lo > 50  # delays over orders of magnitude: a log axis
        if log_scale:
            from matplotlib.ticker import FuncFormatter

            ax.hist(np.maximum(d, lo), bins=np.logspace(math.log10(lo), math.log10(float(d.max()) * 1.01), 30),
                    color=PALETTE[0])
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda _v, _pos: ""))
        else:
            ax.hist(d, bins=30, color=PALETTE[0])
            ax.set_xlim(left=0)
        for q, ls in ((0.5, "-"), (0.9, "--")):
            ax.axvline(float(np.quantile(d, q)), color=PALETTE[5], ls=ls, label=f"{int(q * 100)}th percentile")
        ax.legend(frameon=False)
    ax.set_xlabel("delay from prediction to first label (seconds" + (", log scale)" if log_scale else ")"))
    ax.set_ylabel("labels (count)")
    ax.set_title("Label delay")
    ages = [a for a in COVERAGE_AGES_S]
    labeled = np.array([r["label"] != "" for r in table.rows])
    age = table.read_at - table.created_at
    cov = [float(labeled[age >= a].mean()) if (age >= a).any() else np.nan for a in ages]
    names = [_age(a) for a in ages]
    bx.bar(names, [0 if math.isnan(c) else c for c in cov], color=PALETTE[2])
    _labelled_shares(bx, list(range(len(cov))), cov, "outcomes at least this old", "labeled (%)",
                     "Label coverage by prediction age")
    bx.set_ylim(0, 1.05)
    return _png(fig)


def _num(v: Any) -> str:
    """A number to 4 significant digits (a value cell, a propensity); text as it is."""
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.4g}"
    if v is None:
        return "–"
    try:
        return f"{float(v):.4g}" if isinstance(v, str) and v not in ("", "nan") and any(c == "." for c in v) else str(v)
    except ValueError:
        return str(v)


def _age(s: float) -> str:
    if s <= 0:
        return "any age"
    return f"{s / 86400:g} d" if s >= 86400 else f"{s / 3600:g} h" if s >= 3600 else f"{s / 60:g} min"


def _exploration_plot(ex: dict[str, Any], members: list[str]) -> str:
    fig, (ax, bx) = _figure(2)
    per = ex["members"]
    share = [per[m]["served_share"] or 0 for m in members]
    prop = [per[m]["mean_propensity"] or 0 for m in members]
    x = np.arange(len(members))
    ax.bar(x - 0.2, share, 0.4, label="served share", color=PALETTE[0])
    ax.bar(x + 0.2, prop, 0.4, label="mean propensity when served", color=PALETTE[1], hatch="//", edgecolor="white")
    ax.set_xticks(x, members, rotation=45, ha="right")
    ax.set_ylabel("share of routed requests / probability (%)")
    ax.yaxis.set_major_formatter(_percent_formatter())
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("Who served, and with what propensity")
    y = np.arange(len(members))[::-1]
    for yi, m in zip(y, members):
        v = per[m].get("snips")
        if v is None:
            continue
        lo, hi = per[m].get("snips_lower"), per[m].get("snips_upper")
        err = [[v - lo], [hi - v]] if lo is not None and hi is not None else None
        bx.errorbar(v, yi, xerr=err, fmt="o", color=PALETTE[2], capsize=3)
    bx.set_yticks(y, members)
    bx.set_xlabel("accuracy if it served every request (SNIPS, %)")
    bx.xaxis.set_major_formatter(_percent_formatter())
    bx.set_title("Off-policy value, 95% interval")
    return _png(fig)


def _flips_plot(flips: dict[str, Any]) -> str:
    fig, ax = _figure()
    names = list(flips)
    x = np.arange(len(names))
    imp = [flips[n]["improvements"] for n in names]
    reg = [flips[n]["regressions"] for n in names]
    sysimp = [flips[n]["improvements_on_systemic_failures"] for n in names]
    ax.bar(x - 0.25, imp, 0.25, label="improvements (old wrong, new right)", color=PALETTE[2])
    ax.bar(x, sysimp, 0.25, label="of which on systemic failures", color=PALETTE[4])
    ax.bar(x + 0.25, reg, 0.25, label="regressions (old right, new wrong)", color=PALETTE[5], hatch="\\\\",
           edgecolor="white")
    ax.set_xticks(x, names)
    ax.set_ylabel("labeled outcomes (count)")
    ax.set_ylim(0, max([*imp, *reg, 1]) * 1.35)  # headroom for the legend
    ax.set_title("Candidate versions: what changes")
    ax.legend(frameon=False, fontsize=8, loc="upper center", ncol=3)
    return _png(fig)


# ---------------------------------------------------------------- the page
@dataclass
class _Section:
    title: str
    body: str


def _plot(img: str, alt: str, key: str) -> str:
    w, h = PLOT_SIZE
    return (f'<img class="plot" data-plot="{html.escape(key)}" width="{w}" height="{h}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{img}">')


def _table_html(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _headline(name: str, r: dict[str, Any], n_members: int) -> tuple[str, dict[str, Any]]:
    sfr = r["systemic_failure_rate"]
    band = r["intervals"]["systemic_failure_rate"] or {}
    base = r["independence_baseline"]["systemic_failure_rate"]
    numbers = {"outcomes": r["n_outcomes"], "labeled": r["n"], "systemic_failure_rate": sfr,
               "systemic_failure_lower": band.get("lower"), "systemic_failure_upper": band.get("upper"),
               "independent_systemic_failure_rate": base}
    if sfr is None:
        text = (f"<b>{r['n_outcomes']:,}</b> outcomes recorded, none with a label and every member's output yet: "
                "no failure can be counted.")
        return text, numbers
    times = f", {sfr / base:.0f} times as often" if base and sfr / base >= 2 else ""
    text = (f"Of <b data-metric=\"labeled\">{r['n']:,}</b> labeled outcomes (of <b data-metric=\"outcomes\">"
            f"{r['n_outcomes']:,}</b> recorded), <b data-metric=\"systemic_failure_rate\">{_pct(sfr)}</b> were "
            f"failed by all {n_members} members at once (95% interval {_pct(band.get('lower'))} to "
            f"{_pct(band.get('upper'))}). If the members failed independently of each other, "
            f"<b data-metric=\"independent_systemic_failure_rate\">{_pct(base, 2)}</b> would be{times}.")
    return text, numbers


def _ecosystem_sections(table: EcosystemTable | None, name: str, r: dict[str, Any], members: list[str],
                        csv_name: str, plots: list[str]) -> tuple[str, dict[str, Any]]:
    headline, numbers = _headline(name, r, len(members))
    parts = [f'<h2 id="eco-{html.escape(name)}">{html.escape(name)}</h2>', f'<p class="headline">{headline}</p>']
    cmd = "ecoserve analyze " + " ".join([csv_name, *(table.analyze_args if table else [])]) + " --json"
    parts.append(f"<p class=\"cmd\">Reproduce these numbers: <code>{html.escape(cmd)}</code></p>")

    def section(title: str, body: str) -> None:
        parts.append(f"<section><h3>{html.escape(title)}</h3>{body}</section>")

    def plot(img: str, alt: str, key: str) -> str:
        plots.append(key)
        return _plot(img, alt, f"{name}/{key}")

    if r["systemic_failure_rate"] is not None:
        section("Failures per instance", plot(_failures_plot(r), "failures per instance", "failures") + (
            "<p>How many members got each labeled instance wrong, against what independent members with the same "
            "accuracies would give (a Poisson-binomial distribution). A tall bar at the right end that the "
            "independent bars lack: the members fail the same people.</p>"))
        groups = _group_rows(r)
        if groups:
            rows = [[x["group"], x["n"], _pct(x["rate"]), f"{_pct(x['lower'])} to {_pct(x['upper'])}",
                     _pct(x["baseline"], 2), _pct(x["excess"]), "small: read with care" if x["small"] else ""]
                    for x in groups]
            section("Subgroups and intersections", plot(_subgroup_plot(groups), "subgroups", "subgroups")
                    + _table_html(["subgroup", "labeled", "systemic failure", "95% interval", "if independent",
                                   "excess", ""], rows))
        section("Agreement and accuracy", plot(_agreement_plot(r, members), "agreement heatmap", "agreement"))
    counts = _distinct_answers(table) if table and table.analyze.tolerance is None else None
    multi = [["ambiguity (instances where some Rashomon-set member disagrees with the reference)",
              _pct(r.get("ambiguity"))],
             ["discrepancy (largest share any one Rashomon-set member disagrees with the reference)",
              _pct(r.get("discrepancy"))],
             ["Rashomon set (members within epsilon of the best accuracy)", ", ".join(r.get("rashomon_set") or [])],
             ["reference member", r.get("reference") or ""], ["unanimity (every member the same answer)",
                                                              _pct(r.get("unanimity_rate"))]]
    body = _table_html(["multiplicity", "value"], multi)
    if counts is not None and counts[1:].sum():
        body = plot(_multiplicity_plot(counts), "distinct answers per instance", "multiplicity") + body
    section("Multiplicity", body)
    if table is not None:
        audit = _audit(table, r)
        if audit["cie"] is not None:
            section("Compression-identified exemplars",
                    f"<p>Rate: <b>{_pct(r.get('cie_rate'))}</b> ({r.get('cie_count')} outcomes): the compressed "
                    "members' modal answer differs from the uncompressed ones'. Newest first:</p>"
                    + _table_html(["request id", *members, "label"], audit["cie"]))
        if audit["systemic"]:
            section("Systemic failures (audit list)",
                    f"<p>Labeled outcomes every member got wrong, newest first (at most {AUDIT_ROWS}; all are in "
                    f"<code>{html.escape(csv_name)}</code>):</p>" + _table_html(["request id", *members, "label"],
                                                                               audit["systemic"]))
        if table.label_delay_s.size:
            d = table.label_delay_s
            section("Labels", plot(_labels_plot(table), "label delays and coverage", "labels") + (
                f"<p>{d.size:,} labeled outcomes; median delay {np.median(d):.3g} s, 90th percentile "
                f"{np.quantile(d, 0.9):.3g} s.</p>"))
    ex = r.get("exploration")
    if ex:
        rows = [[m, _pct(v.get("served_share")), _pct(v.get("mean_propensity")), _pct(v.get("ips")),
                 _pct(v.get("snips")), f"{_pct(v.get('snips_lower'))} to {_pct(v.get('snips_upper'))}"]
                for m, v in ex["members"].items()]
        section("Exploration", plot(_exploration_plot(ex, members), "exploration", "exploration")
                + f"<p>Smallest logged propensity {_num(ex.get('min_propensity'))} (the smaller, the noisier the "
                  "estimates). IPS is unbiased but not bounded (it can exceed 100%); SNIPS, normalized, is the "
                  "one to read.</p>"
                + _table_html(["member", "served share", "mean propensity", "IPS", "SNIPS", "SNIPS 95% interval"],
                              rows))
    flips = r.get("flips")
    if flips:
        label = {f"{m} ({new})": v for (m, _old, new), v in zip(table.analyze.versions, flips.values())} \
            if table else flips
        rows = [[k, v["n"], v["improvements"], v["regressions"], _pct(v["negative_flip_rate"]),
                 v["improvements_on_systemic_failures"], _pct(v["share_of_improvements_on_systemic_failures"])]
                for k, v in label.items()]
        section("Candidate versions", plot(_flips_plot(label), "version flips", "flips") + _table_html(
            ["candidate", "labeled", "improvements", "regressions", "negative flip rate",
             "improvements on systemic failures", "their share"], rows))
    est = table.estimated if table else None
    if est:
        rows = [["systemic failure rate", _pct(est["systemic_failure_rate"]),
                 f"{_pct(est['lower'])} to {_pct(est['upper'])}"]]
        rows += [[f"accuracy of {m}", _pct(v), f"{_pct(lo)} to {_pct(hi)}"] for m, (v, lo, hi) in
                 est["accuracy"].items()]
        section("Before the labels arrive", f"<p>{est['n']:,} outcomes still wait for a label. The store's fitted "
                f"label-free estimator (fitted on {est['reference_n']:,} labeled outcomes) estimates:</p>"
                + _table_html(["estimate", "value", "95% interval"], rows))
    return "\n".join(parts), numbers


def _ranking_plots(counts: Any) -> tuple[str, str]:
    est = counts.estimates()
    members = list(counts.members)
    fig, ax = _figure()
    y = np.arange(len(members))[::-1]
    from telemetry.ranking import wilson_float

    for yi, a, m in zip(y, range(len(members)), members):
        n, c = int(counts.served_labeled[a]), int(counts.served_clicks[a])
        if n:
            lo, hi = wilson_float(c / n, n)
            ax.errorbar(c / n, yi + 0.12, xerr=[[c / n - lo], [hi - c / n]], fmt="o", color=PALETTE[0], capsize=3,
                        label="served: observed" if a == 0 else None)
        e = est[m]
        if e["snips"] is not None:
            v, lo2, hi2 = e["snips"], e["snips_lower"] or 0.0, e["snips_upper"] or 0.0
            ax.errorbar(v, yi - 0.12, xerr=[[v - lo2], [hi2 - v]], fmt="s", color=PALETTE[1], capsize=3,
                        label="if it served every request (SNIPS)" if a == 0 else None)
    ax.set_yticks(y, members)
    ax.set_xlabel("click-through (%), 95% interval")
    ax.xaxis.set_major_formatter(_percent_formatter())
    ax.set_title("Click-through of each member's lists")
    ax.set_ylim(-0.6, len(members) - 0.2)
    ax.legend(frameon=False, fontsize=8, loc="upper center", ncol=2, bbox_to_anchor=(0.5, 1.0))
    first = _png(fig)
    fig, ax = _figure()
    slots = np.arange(1, counts.k + 1)
    ctr = counts.slot_clicks / np.maximum(counts.slot_labeled, 1)
    ax.bar(slots - 0.2, ctr, 0.4, color=PALETTE[0], label="clicks per labeled list, all rows")
    ax.set_ylim(0, max(float(ctr.max()), 0.01) * 1.45)  # headroom for the legend
    handles, names = ax.get_legend_handles_labels()
    theta = counts.examination()
    if theta is not None:
        ax2 = ax.twinx()
        ax2.bar(slots + 0.2, theta, 0.4, color=PALETTE[1], hatch="//", edgecolor="white",
                label="examination vs the top slot (shuffled rows)")
        ax2.set_ylabel("examination relative to slot 1 (ratio)")
        ax2.set_ylim(0, max(float(theta.max()), 1.0) * 1.45)
        more = ax2.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    ax.set_xticks(slots)
    ax.set_xlabel("slot (1 = top)")
    ax.set_ylabel("click-through of the slot (%)")
    ax.yaxis.set_major_formatter(_percent_formatter())
    ax.set_title("Position bias: clicks by slot")
    ax.legend(handles, names, frameon=False, fontsize=8, loc="upper right")
    return first, _png(fig)


def _ranking_sections(table: EcosystemTable, csv_name: str, plots: list[str]) -> tuple[str, dict[str, Any]]:
    from telemetry.ranking import wilson_float

    name, rk = table.name, table.ranking
    counts = rk["counts"]
    clicks, misses = rk["clicks"], rk["misses"]
    rate = misses / clicks if clicks else None
    lo, hi = wilson_float(rate, clicks) if rate is not None else (None, None)
    numbers = {"outcomes": len(table.rows), "labeled": rk["labeled"], "clicks": clicks,
               "systemic_miss_rate": rate, "systemic_miss_lower": lo, "systemic_miss_upper": hi}
    head = (f"Of <b data-metric=\"outcomes\">{len(table.rows):,}</b> lists shown, <b data-metric=\"labeled\">"
            f"{rk['labeled']:,}</b> got a label: <b data-metric=\"clicks\">{clicks:,}</b> clicks. "
            + (f"<b data-metric=\"systemic_miss_rate\">{_pct(rate)}</b> of the clicks were on an item in no "
               f"member's top {rk['k']} (a systemic miss; 95% interval {_pct(lo)} to {_pct(hi)})." if rate is not None
               else "No click yet."))
    parts = [f'<h2 id="eco-{html.escape(name)}">{html.escape(name)}</h2>', f'<p class="headline">{head}</p>',
             f"<p class=\"cmd\">A ranking ecosystem: the lists and labels are in <code>{html.escape(csv_name)}"
             "</code> (one row per outcome: the shown list and each member's list, item ids in order).</p>"]
    one, two = _ranking_plots(counts)
    plots += ["ctr", "slots"]
    parts.append("<section><h3>Click-through</h3>" + _plot(one, "click-through", f"{name}/ctr") + (
        "<p>Observed: clicks on a shown item / labeled lists the member served. SNIPS: what its list would get "
        "if it served every request in its own order, from the randomized routing's propensities, corrected for "
        "position bias.</p></section>"))
    parts.append("<section><h3>Position bias</h3>" + _plot(two, "clicks by slot", f"{name}/slots") + "</section>")
    cat = counts.catalogue()
    rows = [[lst, _pct(v["coverage"]), _num(v["gini"]), _pct(v["arp"]), _pct(v["aplt"])] for lst, v in cat.items()]
    over = [[a, b, _pct(float(counts.overlap[i, j] / counts.pairs[i, j]))]
            for i, a in enumerate(counts.members) for j, b in enumerate(counts.members) if i < j and counts.pairs[i, j]]
    parts.append("<section><h3>The catalogue</h3><p>Coverage: share of items that appeared; Gini of exposure; "
                 "ARP: mean popularity (share of clicks) of listed items; APLT: share of listed items outside the "
                 "head.</p>" + _table_html(["list", "coverage", "exposure Gini", "ARP", "APLT"], rows)
                 + _table_html(["member", "other", "overlap@k"], over) + "</section>")
    if rk["audit"]:
        parts.append(f"<section><h3>Systemic misses (audit list)</h3><p>Clicks on an item in no member's list, "
                     f"newest first (at most {AUDIT_ROWS}):</p>"
                     + _table_html(["request id", "clicked", *table.members], rk["audit"]) + "</section>")
    return "\n".join(parts), numbers


def _audit(table: EcosystemTable, r: dict[str, Any]) -> dict[str, Any]:
    """The audit lists' rows (newest first): systemic failures by the current label, and the
    compression-identified exemplars (compressed members' modal answer vs the others')."""
    members = table.members
    opts = table.analyze
    newest = table.rows[::-1]
    systemic: list[list[str]] = []
    for row in newest:
        if row["label"] == "" or any(row[m] == "" for m in members):
            continue
        if opts.tolerance is not None:
            wrong = all(abs(float(row[m]) - float(row["label"])) > opts.tolerance for m in members)
        else:
            wrong = all(row[m] != row["label"] for m in members)
        if wrong:
            systemic.append([row["request_id"], *(_num(row[m]) for m in members), _num(row["label"])])
            if len(systemic) >= AUDIT_ROWS:
                break
    cie: list[list[str]] | None = None
    if opts.compressed and r.get("cie_rate") is not None and opts.tolerance is None:
        cie = []
        comp = [m for m in members if m in opts.compressed]
        full = [m for m in members if m not in opts.compressed]
        for row in newest:
            if any(row[m] == "" for m in members):
                continue
            if _mode([row[m] for m in comp]) != _mode([row[m] for m in full]):
                cie.append([row["request_id"], *(row[m] for m in members), row["label"]])
                if len(cie) >= AUDIT_ROWS:
                    break
    return {"systemic": systemic, "cie": cie}


def _mode(values: list[str]) -> str:
    """The most common answer; ties to the smallest class (as numbers where they are)."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    top = max(counts.values())
    tied = [v for v, c in counts.items() if c == top]
    try:
        return min(tied, key=float)
    except ValueError:
        return min(tied)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:940px;margin:2em auto;padding:0 1em;
color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #0072B2;padding-bottom:.2em;margin-top:2em}
h3{margin-bottom:.3em}.headline{font-size:1.15em;background:#eef5fb;padding:.8em 1em;border-left:4px solid #0072B2}
.meta,.cmd{color:#555;font-size:.9em}code{background:#f3f3f3;padding:.1em .3em;word-break:break-all}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}td,th{border:1px solid #ccc;padding:.25em .5em;
text-align:left}th{background:#f3f3f3}img.plot{display:block;max-width:100%;height:auto;margin:.5em 0}
nav a{margin-right:1em}
"""


def check_output(out: Path) -> None:
    """The output folder exists or can be made, and takes a file (checked before a long read)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".ecoserve-report-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ReportError(f"cannot write the report into {out}: {exc.strerror or exc}") from exc


def write_report(tables: Sequence[EcosystemTable], out: Path, source: str,
                 csv_result: tuple[str, dict[str, Any], list[str]] | None = None) -> Path:
    """Analyse each table (writing its CSV into `out`) and write `out/index.html`."""
    check_output(out)
    bodies, numbers, plots = [], {}, {}
    for t in tables:
        path = out / f"{t.name}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=t.columns, restval="")
            w.writeheader()
            w.writerows(t.rows)
        if t.ranking is not None:
            keys_r: list[str] = []
            body, numbers[t.name] = _ranking_sections(t, path.name, keys_r)
            plots[t.name] = keys_r
            bodies.append(body)
            continue
        try:
            result = analyze_csv(path, t.analyze)
        except AnalysisError as exc:
            raise ReportError(f"{t.name}: {exc}") from exc
        keys: list[str] = []
        body, numbers[t.name] = _ecosystem_sections(t, t.name, result, t.members, path.name, keys)
        numbers[t.name]["analyze_args"] = [path.name, *t.analyze_args, "--json"]
        plots[t.name] = keys
        bodies.append(body)
    if csv_result is not None:
        name, result, members = csv_result
        keys = []
        body, numbers[name] = _ecosystem_sections(None, name, result, members, name, keys)
        plots[name] = keys
        bodies.append(body)
    names = list(numbers)
    nav = "".join(f'<a href="#eco-{html.escape(n)}">{html.escape(n)}</a>' for n in names)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    data = json.dumps({"ecosystems": numbers, "plots": plots, "plot_size": list(PLOT_SIZE)})
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>ecoserve report: {html.escape(', '.join(names))}</title><style>{_CSS}</style></head><body>"
            f"<h1>Ecosystem report</h1><p class=\"meta\">{html.escape(source)} · written {stamp} by "
            f"<code>ecoserve report</code></p><nav>{nav}</nav>{''.join(bodies)}"
            f"<script type=\"application/json\" id=\"ecoserve-report-data\">{html.escape(data, quote=False)}</script>"
            f"</body></html>")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def report_from_csv(path: Path, opts: AnalysisOptions, out: Path) -> Path:
    """`--csv FILE`: the page of one prediction table (what `ecoserve analyze` reads)."""
    try:
        result = analyze_csv(path, opts)
    except AnalysisError as exc:
        raise ReportError(str(exc)) from exc
    members = list(result["members"])
    return write_report([], out, f"table {path}", (path.name, result, members))

