"""Offline analysis of a per-instance predictions table (`ecoserve analyze FILE.csv`).

One row per instance: a label column, one column per member (its predicted
class), optional subgroup columns; for bandit logs a served-member column, its
propensity and the reward. An empty member cell is a missing output; an empty
label is an unlabeled instance. Errors are `AnalysisError` with one line naming
the file, the line and the column.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from telemetry.counts import EcosystemCounts, EcosystemShape, correctness, value_bins, value_correctness
from telemetry.estimation import MIN_FIT, SystemicEstimator, wilson
from telemetry.exploration import ExplorationCounts
from telemetry.summary import DEFAULT_RASHOMON_EPSILON, summarize

__all__ = ["AnalysisError", "AnalysisOptions", "analyze_csv", "format_table"]


class AnalysisError(ValueError):
    """The table cannot be analysed; the message is one line naming the problem."""


@dataclass(frozen=True)
class AnalysisOptions:
    label_column: str = "label"
    group_columns: tuple[str, ...] = ()
    members: tuple[str, ...] = ()  # empty: every column not otherwise named
    mode: Literal["ground_truth", "bandit"] = "ground_truth"
    served_column: str | None = None
    propensity_column: str | None = None
    reward_column: str | None = None
    reference: str | None = None
    compressed: tuple[str, ...] = ()  # member columns that are compressed variants (for CIE)
    epsilon: float = DEFAULT_RASHOMON_EPSILON
    # regression: cells are values; correct = |value - label| <= tolerance; label-free metrics
    # compare bins of bin_width (default: the tolerance) over value_range (models.manifest.RegressionSpec)
    tolerance: float | None = None
    value_range: tuple[float, float] | None = None
    bin_width: float | None = None
    # a labeled table with the same member columns and `<member>__score` columns: the label-free
    # estimator is fitted on it and estimates the rows of this table that have no label
    reference_data: str | None = None
    # (member, old column, new column): the two columns are the current and a candidate version of
    # one member; the old one is the member in the ecosystem, the new one only enters the flip table
    versions: tuple[tuple[str, str, str], ...] = ()


SCORE_SUFFIX = "__score"  # `<member>__score`: the member's score for the class it predicted


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError as exc:
        raise AnalysisError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise AnalysisError(f"{path}: is a directory, not a CSV file") from exc
    except UnicodeDecodeError as exc:
        raise AnalysisError(f"{path}: not a UTF-8 text file") from exc
    except csv.Error as exc:
        raise AnalysisError(f"{path}: not valid CSV: {exc}") from exc
    rows = [r for r in rows if r]  # blank lines
    if not rows:
        raise AnalysisError(f"{path}: the file is empty (no header)")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise AnalysisError(f"{path}: column {dup!r} appears twice in the header")
    body = rows[1:]
    if not body:
        raise AnalysisError(f"{path}: no data rows after the header")
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise AnalysisError(f"{path}: line {i} has {len(r)} fields, the header has {len(header)}")
    return header, body


def _column(path: Path, header: list[str], body: list[list[str]], name: str, role: str) -> list[str]:
    if name not in header:
        raise AnalysisError(f"{path}: {role} column {name!r} not found (columns: {', '.join(header)})")
    j = header.index(name)
    return [r[j].strip() for r in body]


def _numbers(path: Path, values: list[str], name: str) -> np.ndarray:
    out = np.empty(len(values))
    for i, v in enumerate(values):
        try:
            out[i] = float(v) if v != "" else math.nan
        except ValueError as exc:
            raise AnalysisError(f"{path}: line {i + 2}: column {name!r} must be a number, got {v!r}") from exc
    return out


def _class_order(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def _regression(
    p: Path, opts: AnalysisOptions, members: list[str], member_cols: list[list[str]], label_col: list[str] | None
) -> tuple[list[str], np.ndarray, np.ndarray | None] | None:
    """With --tolerance: (bin names, bins of the members' values (-1 missing), correctness) of a
    regression table, the same rules as the live recorder (telemetry.recorder.EcosystemSpec)."""
    if opts.tolerance is None:
        if opts.value_range is not None or opts.bin_width is not None:
            raise AnalysisError(f"{p}: --range and --bin-width are for regression tables: give --tolerance too")
        return None
    if opts.value_range is None:
        raise AnalysisError(f"{p}: a regression table (--tolerance) needs --range LOW,HIGH for the agreement bins")
    from pydantic import ValidationError

    from models.manifest import RegressionSpec, describe_validation_error

    try:
        spec = RegressionSpec(tolerance=opts.tolerance, range=opts.value_range, bin_width=opts.bin_width)
    except ValidationError as exc:
        raise AnalysisError(f"{p}: --tolerance/--range/--bin-width: {'; '.join(describe_validation_error(exc))}") from exc
    raw = np.stack([_numbers(p, col, m) for m, col in zip(members, member_cols)], axis=1)
    if np.isinf(raw).any():
        raise AnalysisError(f"{p}: member values must be finite (an empty cell is a missing output)")
    codes = value_bins(raw, spec.range[0], spec.width, spec.n_bins)
    correct = None
    if label_col is not None:
        correct = value_correctness(raw, _numbers(p, label_col, opts.label_column), spec.tolerance)
    return list(spec.bin_names()), codes, correct


def analyze_csv(path: str | Path, opts: AnalysisOptions) -> dict[str, Any]:
    """Every ecosystem metric of the table, as the JSON object `ecoserve analyze --json` prints."""
    p = Path(path)
    header, body = _read(p)
    named = {opts.label_column, *opts.group_columns}
    named |= {c for c in (opts.served_column, opts.propensity_column, opts.reward_column) if c}
    named |= {h for h in header if h.endswith(SCORE_SUFFIX)}
    named |= {new for _, _, new in opts.versions}
    members = list(opts.members) or [h for h in header if h not in named]
    if len(members) < 2:
        raise AnalysisError(f"{p}: need at least 2 member columns, found {members}")
    for member, old, new in opts.versions:
        for column in (old, new):
            _column(p, header, body, column, f"--versions {member}")
        if new == old:
            raise AnalysisError(f"{p}: --versions {member}: the new version's column {new!r} must not be a member column")
        if old not in members:
            raise AnalysisError(f"{p}: --versions {member}: the current version's column {old!r} is not a member "
                                f"column ({', '.join(members)})")
        if new in members:
            raise AnalysisError(f"{p}: --versions {member}: the new version's column {new!r} must not be a member column")
    if opts.versions and opts.mode == "bandit":
        raise AnalysisError(f"{p}: --versions needs labels (ground-truth mode): a bandit log knows only the served output")
    n_members = len(members)
    # the new versions' columns are read with the members' (same classes, same correctness rules) and split off
    member_cols = [_column(p, header, body, m, "member") for m in [*members, *(new for _, _, new in opts.versions)]]
    bandit = opts.mode == "bandit"
    if bandit:
        for flag, col in (
            ("--served-column", opts.served_column),
            ("--propensity-column", opts.propensity_column),
            ("--reward-column", opts.reward_column),
        ):
            if not col:
                raise AnalysisError(f"{p}: bandit mode needs {flag}")
        label_col = None
    else:
        label_col = _column(p, header, body, opts.label_column, "label")
    regression = _regression(p, opts, [*members, *(new for _, _, new in opts.versions)], member_cols, label_col)
    if regression is not None:
        classes, preds, correct_reg = regression
    else:
        values = {v for col in member_cols for v in col if v != ""}
        if label_col is not None:
            values |= {v for v in label_col if v != ""}
        ref_table = _reference_table(opts, members) if opts.reference_data else None
        if ref_table is not None:
            values |= {v for col in (*ref_table[0], ref_table[1]) for v in col if v != ""}
        classes = _class_order(values)
        if not classes:
            raise AnalysisError(f"{p}: every member cell is empty")
        index = {c: i for i, c in enumerate(classes)}
        preds = np.array([[index[v] if v != "" else -1 for v in col] for col in member_cols], dtype=np.int64).T
    n = preds.shape[0]

    served = None
    if opts.served_column:
        names = _column(p, header, body, opts.served_column, "served")
        bad = next((i for i, v in enumerate(names) if v not in members), None)
        if bad is not None:
            raise AnalysisError(
                f"{p}: line {bad + 2}: column {opts.served_column!r} must name a member, got {names[bad]!r}"
            )
        served = np.array([members.index(v) for v in names], dtype=np.int64)
    propensity = None
    if opts.propensity_column:
        propensity = _numbers(p, _column(p, header, body, opts.propensity_column, "propensity"), opts.propensity_column)
        bad_p = np.flatnonzero(~((propensity > 0) & (propensity <= 1)))
        if bad_p.size:
            i = int(bad_p[0])
            raise AnalysisError(
                f"{p}: line {i + 2}: column {opts.propensity_column!r} must be in (0, 1], got {propensity[i]}"
            )
    rewards = None
    if opts.reward_column:
        rewards = _numbers(p, _column(p, header, body, opts.reward_column, "reward"), opts.reward_column)

    if bandit:
        assert served is not None and rewards is not None
        correct = correctness(preds, served=served, rewards=rewards)
    else:
        assert label_col is not None
        if regression is not None:
            assert correct_reg is not None
            correct = correct_reg
        else:
            labels = np.array([index[v] if v != "" else -1 for v in label_col], dtype=np.int64)
            correct = correctness(preds, labels)
        new_correct = correct[:, n_members:]
        preds, correct = preds[:, :n_members], correct[:, :n_members]
        if served is not None:
            rows = np.arange(n)
            c_served = correct[rows, served]
            rewards = np.where(c_served >= 0, c_served.astype(float), np.nan)

    groups = {g: _column(p, header, body, g, "group") for g in opts.group_columns}
    reference = 0
    if opts.reference is not None:
        if opts.reference not in members:
            raise AnalysisError(f"{p}: --reference {opts.reference!r} is not a member column ({', '.join(members)})")
        reference = members.index(opts.reference)
    unknown = [c for c in opts.compressed if c not in members]
    if unknown:
        raise AnalysisError(f"{p}: --compressed {unknown[0]!r} is not a member column ({', '.join(members)})")
    shape = EcosystemShape(
        members=tuple(members),
        n_classes=len(classes),
        reference=reference,
        compressed=tuple(m in opts.compressed for m in members) if opts.compressed else (),
        subgroups={g: tuple(sorted(set(v))) for g, v in groups.items()},
        # with two or more group columns, their full intersection is analysed too
        intersections=(tuple(groups),) if len(groups) >= 2 else (),
    )
    counts = EcosystemCounts.from_arrays(shape, preds, correct, groups or None)
    result = summarize(counts, opts.epsilon)
    result["classes"] = classes
    result["mode"] = opts.mode
    result["intervals"] = _intervals(result, counts, members)
    if opts.reference_data:
        if regression is not None or bandit or ref_table is None:
            raise AnalysisError(f"{p}: --reference-data needs a classification table with a label column")
        assert label_col is not None
        index = {c: i for i, c in enumerate(classes)}
        scores = _scores(p, header, body, members, required=False)
        ref_cols, ref_labels, ref_scores = ref_table
        ref_preds = np.array([[index[v] if v != "" else -1 for v in col] for col in ref_cols], dtype=np.int64).T
        ref_correct = correctness(ref_preds, np.array([index[v] if v != "" else -1 for v in ref_labels], dtype=np.int64))
        ref_served = np.full(len(ref_labels), reference, dtype=np.int64)
        est = SystemicEstimator.fit(tuple(members), ref_preds, ref_scores, ref_served, ref_correct)
        if est is None:
            raise AnalysisError(f"{opts.reference_data}: too few labeled rows to fit on (at least {MIN_FIT} with "
                                "every member's output and a label, some of them failed by every member)")
        waiting = np.array([v == "" for v in label_col])
        served_now = served if served is not None else np.full(n, reference, dtype=np.int64)
        sums = est.sums(preds[waiting], scores[waiting], served_now[waiting])
        sfr = est.finish(sums)
        result["estimated"] = {
            "n": int(waiting.sum()), "reference_n": est.n_fit, "reference_systemic_failure_rate": est.base_rate,
            "systemic_failure_rate": {"value": sfr.value if sfr.n else None, "lower": sfr.lower, "upper": sfr.upper},
            "accuracy": {m: {"value": a.value if a.n else None, "lower": a.lower, "upper": a.upper}
                         for m, a in zip(members, est.finish_accuracy(sums))},
        }
    if opts.versions:
        result["flips"] = {member: _flips(correct, members.index(old), new_correct[:, k])
                           for k, (member, old, _) in enumerate(opts.versions)}
    if served is not None and propensity is not None and rewards is not None:
        ok = ~np.isnan(rewards)
        exp = ExplorationCounts.from_arrays(
            members, len(classes), preds[ok], served[ok], rewards[ok], propensity[ok]
        )
        in_unit = bool(((rewards[ok] >= 0) & (rewards[ok] <= 1)).all())
        result["exploration"] = exp.summary(rewards_in_unit=in_unit)
    return result


def _flips(correct: np.ndarray, a: int, new: np.ndarray) -> dict[str, Any]:
    """The flip table of one member's two versions (telemetry.flips: the same definitions as the live
    counters); a systemic failure: every *other* member wrong."""
    from telemetry.flips import delta_interval
    from telemetry.version_change import VersionChangeCounts

    others = np.delete(correct, a, axis=1)
    c = VersionChangeCounts.from_arrays(correct[:, a], new, others)
    known = (correct[:, a] >= 0) & (new >= 0) & (others >= 0).all(axis=1)
    out: dict[str, Any] = {
        "n": c.n, "excluded": c.excluded, "improvements": c.improvements, "regressions": c.regressions,
        "negative_flip_rate": c.regressions / c.n if c.n else None,
        "improvements_on_systemic_failures": c.improvements_on_systemic,
        "share_of_improvements_on_systemic_failures": c.improvements_on_systemic / c.improvements if c.improvements else None,
        "current_accuracy": float((correct[known, a] == 1).mean()) if c.n else None,
        "candidate_accuracy": float((new[known] == 1).mean()) if c.n else None,
    }
    intervals: dict[str, Any] = {}
    if c.n:
        lo, hi = wilson(c.regressions, c.n)
        intervals["negative_flip_rate"] = {"lower": float(lo), "upper": float(hi)}
        d = delta_interval(c.improvements, c.regressions, c.n)
        assert d is not None
        intervals["accuracy_delta"] = {"value": d[0], "lower": d[1], "upper": d[2]}
    if c.improvements:
        lo, hi = wilson(c.improvements_on_systemic, c.improvements)
        intervals["share_of_improvements_on_systemic_failures"] = {"lower": float(lo), "upper": float(hi)}
    out["intervals"] = intervals
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def _scores(path: Path, header: list[str], body: list[list[str]], members: Sequence[str],
            required: bool) -> np.ndarray:
    """`<member>__score` columns as an (n, M) array (NaN: empty cell or no such column)."""
    out = np.full((len(body), len(members)), np.nan)
    for a, m in enumerate(members):
        name = m + SCORE_SUFFIX
        if name not in header:
            if required:
                raise AnalysisError(f"{path}: no column {name!r} (each member's score for the class it predicted)")
            continue
        col = _column(path, header, body, name, "score")
        vals = _numbers(path, ["nan" if v == "" else v for v in col], name)
        bad = np.flatnonzero(~np.isnan(vals) & ~((vals >= 0) & (vals <= 1)))
        if bad.size:
            raise AnalysisError(f"{path}: line {int(bad[0]) + 2}: column {name!r} must be in [0, 1], got {vals[bad[0]]}")
        out[:, a] = vals
    return out


def _reference_table(opts: AnalysisOptions, members: Sequence[str]) -> tuple[list[list[str]], list[str], np.ndarray]:
    """The reference table's member columns, labels and scores."""
    assert opts.reference_data is not None
    rp = Path(opts.reference_data)
    header, body = _read(rp)
    cols = [_column(rp, header, body, m, "member") for m in members]
    labels = _column(rp, header, body, opts.label_column, "label")
    return cols, labels, _scores(rp, header, body, members, required=True)


def _intervals(result: dict[str, Any], counts: EcosystemCounts, members: Sequence[str]) -> dict[str, Any]:
    """95% Wilson intervals of the ratios the analysis reports."""
    def band(rate: float | None, n: int) -> dict[str, float] | None:
        if rate is None or n == 0:
            return None
        lo, hi = wilson(round(rate * n), n)
        return {"lower": float(lo), "upper": float(hi)}

    n_c = int(counts.n_complete)
    return {
        "systemic_failure_rate": band(result.get("systemic_failure_rate"), n_c),
        "consistent_success_rate": band(result.get("consistent_success_rate"), n_c),
        "unanimity_rate": band(result.get("unanimity_rate"), int(counts.n_predicted)),
        "accuracy": {m: band(result.get("accuracy", {}).get(m), int(counts.member_n[a])) for a, m in enumerate(members)},
    }


def format_table(result: dict[str, Any]) -> str:
    """A readable, one-screen rendering of `analyze_csv`'s result."""
    lines = [
        f"outcomes: {result['n_outcomes']}   labeled: {result['n']}   complete: {result['n_complete']}"
        f"   incomplete (missing outputs): {result['n_incomplete']}   mode: {result['mode']}",
        "",
    ]
    base = result["independence_baseline"]
    excess = result["homogeneity_excess"]
    summary_rows = [
        ("systemic failure rate", result["systemic_failure_rate"], base["systemic_failure_rate"],
         excess["systemic_failure_rate"]),
        ("consistent success rate", result["consistent_success_rate"], base["consistent_success_rate"],
         excess["consistent_success_rate"]),
        ("homogeneous outcome rate", result["homogeneous_outcome_rate"], None, None),
        ("unanimity rate (label-free)", result["unanimity_rate"], None, None),
        (f"ambiguity (ref {result['reference']})", result["ambiguity"], None, None),
        ("discrepancy", result["discrepancy"], None, None),
    ]
    if result.get("cie_rate") is not None:
        summary_rows.append(("CIE rate", result["cie_rate"], None, None))
    table = [["metric", "observed", "independent", "excess"]] + [
        [name, _fmt(o), _fmt(b), _fmt(e)] for name, o, b, e in summary_rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines += [_row(r, widths) for r in table]
    lines.append("")
    members = result["members"]
    kap = result["kappa"]
    mt = [["member", "accuracy", "mean kappa"]]
    for m in members:
        ks = [kap[m][o] for o in members if o != m and kap[m][o] is not None]
        mt.append([m, _fmt(result["accuracy"][m]), _fmt(sum(ks) / len(ks) if ks else None)])
    widths = [max(len(r[i]) for r in mt) for i in range(3)]
    lines += [_row(r, widths) for r in mt]
    fpi = result["failures_per_instance"]
    if fpi["observed"] is not None:
        lines += ["", "failures per instance k:  " + "  ".join(f"{k:>6}" for k in range(len(fpi["observed"])))]
        lines.append("  observed                " + "  ".join(f"{v:6.4f}" for v in fpi["observed"]))
        lines.append("  independent             " + "  ".join(f"{v:6.4f}" for v in fpi["independent"]))
    for key, values in result.get("groups", {}).items():
        lines += ["", f"by {key}:"]
        gt = [["value", "n", "SFR", "baseline", "excess", "unanimity"]]
        for value, g in values.items():
            gt.append([
                value, str(g["n"]), _fmt(g["systemic_failure_rate"]),
                _fmt(g["independence_baseline"]["systemic_failure_rate"]),
                _fmt(g["homogeneity_excess"]["systemic_failure_rate"]), _fmt(g["unanimity_rate"]),
            ])
        widths = [max(len(r[i]) for r in gt) for i in range(6)]
        lines += ["  " + _row(r, widths) for r in gt]
    sfr_band = result.get("intervals", {}).get("systemic_failure_rate")
    if sfr_band:
        lines += ["", f"systemic failure rate, 95% interval: {_fmt(sfr_band['lower'])} - {_fmt(sfr_band['upper'])}"]
    if "estimated" in result:
        est = result["estimated"]
        e = est["systemic_failure_rate"]
        lines += ["", f"estimated for the {est['n']} rows without a label (fitted on {est['reference_n']} labeled "
                      f"reference rows, whose own rate is {_fmt(est['reference_systemic_failure_rate'])}):",
                  f"  systemic failure rate {_fmt(e['value'])} (95% interval {_fmt(e['lower'])} - {_fmt(e['upper'])})"]
        for m, a in est["accuracy"].items():
            lines.append(f"  accuracy of {m}: {_fmt(a['value'])} ({_fmt(a['lower'])} - {_fmt(a['upper'])})")
    for member, f in result.get("flips", {}).items():
        ivl = f["intervals"]
        lines += ["", f"version change of {member} ({f['n']} labeled rows where both versions and every other member "
                      f"answered):",
                  f"  accuracy {_fmt(f['current_accuracy'])} -> {_fmt(f['candidate_accuracy'])}"
                  + (f" (difference {_fmt(ivl['accuracy_delta']['value'])}, 95% interval "
                     f"{_fmt(ivl['accuracy_delta']['lower'])} - {_fmt(ivl['accuracy_delta']['upper'])})"
                     if "accuracy_delta" in ivl else ""),
                  f"  improvements {f['improvements']}, regressions (negative flips) {f['regressions']}, "
                  f"negative flip rate {_fmt(f['negative_flip_rate'])}",
                  f"  improvements on systemic failures (every other member wrong): "
                  f"{f['improvements_on_systemic_failures']} of {f['improvements']} "
                  f"({_fmt(f['share_of_improvements_on_systemic_failures'])})"]
    if "exploration" in result:
        ex = result["exploration"]
        lines += ["", f"exploration: min propensity {_fmt(ex['min_propensity'])}"]
        et = [["member", "served share", "IPS", "SNIPS", "ESS"]]
        for m, v in ex["members"].items():
            et.append([m, _fmt(v["served_share"]), _fmt(v["ips"]), _fmt(v["snips"]), _fmt(v["effective_sample_size"])])
        widths = [max(len(r[i]) for r in et) for i in range(5)]
        lines += ["  " + _row(r, widths) for r in et]
    return "\n".join(lines)
