"""Grafana dashboards as code (grafana-foundation-sdk), generated from one panel list.

`build_dashboards()` returns the six dashboards as JSON-able dicts (Grafana's current
dashboard schema); `write_dashboards(dir)` writes them (committed under
`k8s/base/dashboards/`; a test fails when they are stale). Every dashboard is templated by
a Prometheus data source variable, `ecosystem`, `member` and `subgroup`, and a
`window` for the ratios computed from additive counters. Every panel says what it
means and what a bad value looks like.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, dashboard, heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    VariableOption,
    VariableRefresh,
)

__all__ = ["PanelSpec", "DASHBOARDS", "build_dashboards", "write_dashboards", "panel_queries", "DASHBOARDS_DIR"]

# where the dashboards live in the repository, relative to its root (the CLI passes the root)
DASHBOARDS_DIR = Path("k8s") / "base" / "dashboards"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
E = 'ecosystem=~"$ecosystem"'
ALL = 'subgroup="all"'
W = "[$window]"


@dataclass(frozen=True)
class PanelSpec:
    kind: str  # timeseries | stat | bargauge | table_matrix | heatmap
    title: str
    description: str
    queries: tuple[tuple[str, str], ...]  # (expr, legend)
    unit: str = "percentunit"
    width: int = 12
    height: int = 8
    instant: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _band(metric: str, selector: str, legend: str, value_legend: str | None = None) -> tuple[tuple[str, str], ...]:
    """A gauge and its interval ends (`metric_lower`, `metric_upper`): the three queries of a panel
    that draws the ends dashed (`extra={"interval": True}`)."""
    return ((f"{metric}{{{selector}}}", value_legend or legend),
            (f"{metric}_lower{{{selector}}}", f"{legend} lower"),
            (f"{metric}_upper{{{selector}}}", f"{legend} upper"))


def _ratio(num: str, den: str, by: str = "ecosystem") -> str:
    return f"sum by ({by}) (increase({num}{W})) / sum by ({by}) (increase({den}{W}))"


SFR = _ratio(f"ecoserve_systemic_failures_total{{{E},{ALL}}}", f"ecoserve_complete_outcomes_total{{{E},{ALL}}}")
BASELINE = (
    f"exp(sum by (ecosystem) (ln(1 - sum by (ecosystem, member) (increase(ecoserve_member_correct_total{{{E},{ALL}}}{W}))"
    f" / sum by (ecosystem, member) (increase(ecoserve_member_labeled_total{{{E},{ALL}}}{W})))))"
)

OVERVIEW = [
    PanelSpec("timeseries", "Systemic failure rate vs independence baseline",
              "Share of labeled outcomes that every member got wrong (people with no recourse), next to what it would "
              "be if members failed independently (product of their error rates). Bad: the observed line far above "
              "the baseline, or rising.",
              ((SFR, "{{ecosystem}} observed"), (BASELINE, "{{ecosystem}} independent"))),
    PanelSpec("timeseries", "Homogeneity excess (systemic failure minus baseline)",
              "How much more often all members fail together than independent members would, over the recorder's "
              "rolling window, with the 95% lower bound of the excess (dashed). Bad: clearly above 0 and growing; "
              "alerts fire when the lower bound is above the configured threshold.",
              ((f"ecoserve_window_systemic_failure_excess_ratio{{{E},{ALL}}}", "{{ecosystem}}"),
               (f"ecoserve_window_systemic_failure_excess_ratio_lower{{{E},{ALL}}}", "{{ecosystem}} lower")),
              extra={"interval": True}),
    PanelSpec("timeseries", "Systemic failure rate (rolling window) with its 95% interval",
              "The recorder's rolling-window systemic failure rate and its Wilson interval (dashed): a window with "
              "few labeled outcomes has a wide interval. Bad: the lower line rising.",
              _band("ecoserve_window_systemic_failure_ratio", f"{E},{ALL}", "{{ecosystem}}"),
              extra={"interval": True}),
    PanelSpec("timeseries", "Estimated systemic failure, before the labels (label-free)",
              "For the window's outcomes still waiting for labels: the estimated share every member gets wrong, "
              "with its 95% interval (dashed), from an estimator fitted on labeled outcomes; and how far its "
              "estimates were from the realized rate once those labels came (error). Bad: the estimate rising, "
              "or a large error (the estimator no longer fits: concept shift).",
              (*_band("ecoserve_estimated_systemic_failure_ratio", f"{E},{ALL}", "{{ecosystem}}",
                      "{{ecosystem}} estimated"),
               (f"ecoserve_estimator_error{{{E}}}", "{{ecosystem}} estimator error")),
              extra={"interval": True}),
    PanelSpec("timeseries", "Consistent success rate",
              "Share of labeled outcomes every member got right. Bad: falling while accuracy holds (errors are "
              "spreading across members).",
              ((_ratio(f"ecoserve_consistent_successes_total{{{E},{ALL}}}", f"ecoserve_complete_outcomes_total{{{E},{ALL}}}"), "{{ecosystem}}"),)),
    PanelSpec("timeseries", "Unanimity (label-free)",
              "Share of outcomes where every member predicted the same class; needs no labels, so it moves before "
              "labels arrive. Bad: a sharp drop (input drift, a broken member).",
              ((_ratio(f"ecoserve_unanimous_total{{{E},{ALL}}}", f"ecoserve_predicted_total{{{E},{ALL}}}"), "{{ecosystem}}"),)),
    PanelSpec("bargauge", "Failures per instance: observed vs independent",
              "Distribution of how many members fail on an outcome (k = 0..M), observed and under independence "
              "(Poisson-binomial), over the rolling window. Bad: observed mass at k = M far above independent.",
              ((f"ecoserve_window_failures_per_instance_ratio{{{E}}}", "{{ecosystem}} {{kind}} k={{k}}"),), instant=True,
              width=12),
    PanelSpec("timeseries", "Member accuracy",
              "Accuracy of each member on labeled outcomes. Bad: one member dropping away from the others.",
              ((_ratio(f'ecoserve_member_correct_total{{{E},member=~"$member",{ALL}}}',
                       f'ecoserve_member_labeled_total{{{E},member=~"$member",{ALL}}}', "ecosystem, member"),
                "{{ecosystem}} {{member}}"),)),
    PanelSpec("table_matrix", "Pairwise kappa",
              "Cohen's kappa between members (agreement beyond chance, label-free), rolling window. Bad: values "
              "near 1 everywhere (members are copies: no diversity) or a member near 0 with all others (broken).",
              ((f'ecoserve_window_kappa{{{E},member_a=~"$member"}}', ""),), unit="none", instant=True, width=12,
              extra={"row": "member_a", "column": "member_b"}),
    PanelSpec("timeseries", "Pairwise agreement",
              "Share of outcomes on which two members agree (label-free). Bad: a pair's agreement dropping fast.",
              ((f'increase(ecoserve_pair_agreements_total{{{E},member_a=~"$member",{ALL}}}{W}) / ignoring(member_a, '
                f"member_b) group_left increase(ecoserve_predicted_total{{{E},{ALL}}}{W})",
                "{{ecosystem}} {{member_a}}-{{member_b}}"),)),
    PanelSpec("timeseries", "Ambiguity and discrepancy",
              "Ambiguity: share of outcomes where some near-best member disagrees with the reference (served or "
              "primary) member; discrepancy: the largest such share for one member. Bad: high values mean the "
              "served answer depends on an arbitrary choice of model.",
              ((f"ecoserve_window_ambiguity_ratio{{{E}}}", "{{ecosystem}} ambiguity"),
               (f"ecoserve_window_discrepancy_ratio{{{E}}}", "{{ecosystem}} discrepancy"))),
    PanelSpec("timeseries", "Compression-identified exemplars",
              "Share of outcomes where the compressed members' modal prediction differs from the uncompressed ones' "
              "(the long tail compression loses). Bad: rising, or concentrated in a subgroup.",
              ((f"ecoserve_window_cie_ratio{{{E}}}", "{{ecosystem}}"),)),
]

SUBGROUPS = [
    PanelSpec("timeseries", "Systemic failure rate by subgroup",
              "Systemic failure rate inside each declared subgroup value and intersection ('other' = undeclared "
              "values). Bad: one group far above the others.",
              ((_ratio(f'ecoserve_systemic_failures_total{{{E},subgroup=~"$subgroup"}}',
                       f'ecoserve_complete_outcomes_total{{{E},subgroup=~"$subgroup"}}', "ecosystem, subgroup, subgroup_value"),
                "{{subgroup}}={{subgroup_value}}"),)),
    PanelSpec("bargauge", "Systemic failure excess by subgroup",
              "Observed systemic failure minus each group's own independence baseline (rolling window). Bad: a "
              "group with a large positive excess: its members fail together on it.",
              ((f'ecoserve_window_systemic_failure_excess_ratio{{{E},subgroup=~"$subgroup"}}',
                "{{subgroup}}={{subgroup_value}}"),), instant=True),
    PanelSpec("bargauge", "Systemic failure vs baseline by subgroup",
              "Side by side per group: observed systemic failure and its independence baseline. Bad: the observed "
              "bar dwarfing the baseline for some groups only.",
              ((f'ecoserve_window_systemic_failure_ratio{{{E},subgroup=~"$subgroup"}}', "{{subgroup_value}} observed"),
               (f'ecoserve_window_systemic_failure_baseline_ratio{{{E},subgroup=~"$subgroup"}}', "{{subgroup_value}} baseline")),
              instant=True),
    PanelSpec("timeseries", "Labeled outcomes by subgroup",
              "How many labeled outcomes each group contributes per window (small groups have noisy rates). Bad: a "
              "group with almost no labels (its metrics cannot be trusted).",
              ((f'sum by (subgroup, subgroup_value) (increase(ecoserve_complete_outcomes_total{{{E},subgroup=~"$subgroup"}}{W}))',
                "{{subgroup}}={{subgroup_value}}"),), unit="short"),
]

LABELS = [
    PanelSpec("heatmap", "Label delay distribution",
              "When labels arrive after their prediction (first labels). Bad: the mass moving right (labels "
              "arriving later and later) or vanishing.",
              ((f"sum by (le) (increase(ecoserve_label_delay_seconds_bucket{{{E}}}{W}))", "{{le}}"),), unit="s"),
    PanelSpec("timeseries", "Label delay p50 / p90",
              "Median and 90th percentile of label delay. Bad: climbing quantiles (the feedback loop slows).",
              ((f"histogram_quantile(0.5, sum by (ecosystem, le) (rate(ecoserve_label_delay_seconds_bucket{{{E}}}{W})))", "{{ecosystem}} p50"),
               (f"histogram_quantile(0.9, sum by (ecosystem, le) (rate(ecoserve_label_delay_seconds_bucket{{{E}}}{W})))", "{{ecosystem}} p90")),
              unit="s"),
    PanelSpec("timeseries", "Label coverage by prediction age",
              "Share of outcomes older than each age that have a label. Bad: coverage of old outcomes falling (the "
              "label pipeline is losing labels).",
              ((f"ecoserve_label_coverage_ratio{{{E}}}", "{{ecosystem}} older than {{age_seconds}} s"),)),
    PanelSpec("timeseries", "Observed vs assumed labels",
              "Labels per window by source: observed (posted) and assumed (timeout). Bad: assumed dominating "
              "(real labels are not arriving).",
              ((f"sum by (ecosystem, source) (increase(ecoserve_labeled_outcomes_total{{{E},{ALL}}}{W}))", "{{ecosystem}} {{source}}"),),
              unit="short"),
    PanelSpec("timeseries", "Corrections, duplicates, unknown ids",
              "Labels that changed an existing label, repeated ones, and ones whose request id was unknown on "
              "arrival. Bad: corrections or unknown ids rising (clients send wrong ids, or labels are unstable).",
              ((f"sum by (ecosystem, from_source, to_source) (increase(ecoserve_label_corrections_total{{{E}}}{W}))", "{{ecosystem}} corrections {{from_source}}->{{to_source}}"),
               (f"sum by (ecosystem) (increase(ecoserve_labels_duplicate_total{{{E}}}{W}))", "{{ecosystem}} duplicates"),
               (f"increase(ecoserve_feedback_unknown_id_total{W})", "unknown ids")),
              unit="short"),
    PanelSpec("timeseries", "Pending and expired labels",
              "Labels waiting for their outcome, and those dropped after the TTL. Bad: pending growing without "
              "bound, any expiries (labels with ids that never match).",
              (("ecoserve_labels_pending", "pending"), (f"increase(ecoserve_labels_expired_total{W})", "expired")),
              unit="short"),
]

EXPLORATION = [
    PanelSpec("timeseries", "Exploration rate",
              "Share of policy-routed outcomes served by a member other than the greedy one. Bad: 0 under an "
              "exploring policy (the feedback loop only sees what it already serves), or far above the intended rate.",
              ((f"sum by (ecosystem) (increase(ecoserve_explored_total{{{E}}}{W})) / (sum by (ecosystem) "
                f"(increase(ecoserve_served_total{{{E}}}{W})) - sum by (ecosystem) (increase(ecoserve_direct_total{{{E}}}{W})))",
                "{{ecosystem}}"),)),
    PanelSpec("timeseries", "Served share per member",
              "Share of outcomes each member served. Bad: one member taking everything under an exploring policy.",
              ((f'sum by (ecosystem, member) (increase(ecoserve_served_total{{{E},member=~"$member"}}{W})) / on (ecosystem) '
                f"group_left sum by (ecosystem) (increase(ecoserve_served_total{{{E}}}{W}))", "{{ecosystem}} {{member}}"),)),
    PanelSpec("timeseries", "Served-output entropy",
              "Entropy (bits) of the outputs callers received in the window: the classes (regression: value bins). "
              "Bad: a steady fall (a degenerate feedback loop narrowing what is served, and so what labels can "
              "teach) that the inputs do not explain.",
              ((f"ecoserve_window_served_output_entropy{{{E}}}", "{{ecosystem}}"),), unit="none"),
    PanelSpec("timeseries", "Mean logged propensity per member",
              "Average propensity with which each member was served. Bad: values near 0 (huge importance weights).",
              ((f'increase(ecoserve_served_propensity_total{{{E},member=~"$member"}}{W}) / '
                f'increase(ecoserve_served_total{{{E},member=~"$member"}}{W})', "{{ecosystem}} {{member}}"),),
              unit="none"),
    PanelSpec("stat", "Minimum propensity",
              "Smallest logged propensity among labeled policy-routed outcomes in the window. Bad: below the "
              "positivity floor (off-policy estimates become unreliable); an alert fires.",
              ((f"ecoserve_window_min_propensity{{{E}}}", "{{ecosystem}}"),), unit="none", instant=True, width=6),
    PanelSpec("bargauge", "Effective sample size per member",
              "Effective number of samples behind each member's off-policy estimate. Bad: small values (the "
              "estimate rests on a few heavily weighted outcomes).",
              ((f'ecoserve_window_effective_sample_size{{{E},member=~"$member"}}', "{{ecosystem}} {{member}}"),),
              unit="short", instant=True, width=6),
    PanelSpec("timeseries", "IPS and SNIPS value per member",
              "Off-policy estimate of each member's reward if it served everything (IPS and self-normalized IPS). "
              "Bad: IPS and SNIPS far apart (high variance), or a member estimated better than the one served.",
              ((f'ecoserve_window_ips{{{E},member=~"$member"}}', "{{ecosystem}} {{member}} IPS"),
               (f'ecoserve_window_snips{{{E},member=~"$member"}}', "{{ecosystem}} {{member}} SNIPS")),
              unit="none"),
    PanelSpec("timeseries", "SNIPS spread across members",
              "Best minus worst member by SNIPS. Bad: a large spread that persists (the policy should be moving).",
              ((f"max by (ecosystem) (ecoserve_window_snips{{{E}}}) - min by (ecosystem) (ecoserve_window_snips{{{E}}})",
                "{{ecosystem}}"),), unit="none"),
]

SERVING = [
    PanelSpec("timeseries", "Requests by status",
              "Inference requests per second at the gateways, by HTTP status. Bad: 5xx (503: no member could "
              "answer) or a jump in 4xx (a client sends bad input).",
              ((f"sum by (ecosystem, code) (rate(ecoserve_requests_total{{{E}}}{W}))", "{{ecosystem}} {{code}}"),),
              unit="reqps"),
    PanelSpec("timeseries", "Outcomes recorded per second",
              "Rows served and recorded. Bad: below the request rate times rows per request (records lost).",
              ((f"sum by (ecosystem) (rate(ecoserve_outcomes_total{{{E}}}{W}))", "{{ecosystem}}"),), unit="short"),
    PanelSpec("timeseries", "Member latency p50 / p99 (by provider)",
              "Time of one member call (one dynamic batch) at the gateway, per member and execution provider. "
              "Bad: one member's p99 near member_timeout_s (it will start missing outputs).",
              ((f'histogram_quantile(0.5, sum by (ecosystem, member, provider, le) (rate(ecoserve_member_latency_seconds_bucket{{{E},member=~"$member"}}{W})))',
                "{{member}} ({{provider}}) p50"),
               (f'histogram_quantile(0.99, sum by (ecosystem, member, provider, le) (rate(ecoserve_member_latency_seconds_bucket{{{E},member=~"$member"}}{W})))',
                "{{member}} ({{provider}}) p99")),
              unit="s"),
    PanelSpec("timeseries", "Member errors and missing outputs",
              "Member calls that errored or timed out, and outcomes missing a member's output. Bad: any sustained "
              "rate (the ecosystem metrics then exclude those outcomes).",
              ((f'sum by (ecosystem, member, kind) (increase(ecoserve_member_errors_total{{{E},member=~"$member"}}{W}))', "{{member}} {{kind}}"),
               (f'sum by (ecosystem, member) (increase(ecoserve_member_missing_outputs_total{{{E},member=~"$member"}}{W}))', "{{member}} missing")),
              unit="short"),
    PanelSpec("timeseries", "Fallbacks, dropped and lost records",
              "Rows served by a fallback because the chosen member failed; outcome records the gateways dropped "
              "(queue full) or lost (a gateway crashed with them queued). "
              "Bad: any dropped or lost records (telemetry is missing data), sustained fallbacks.",
              ((f"sum by (ecosystem, member) (increase(ecoserve_fallbacks_total{{{E}}}{W}))", "{{ecosystem}} fallback from {{member}}"),
               (f"sum by (reason) (increase(ecoserve_outcomes_dropped_total{W}))", "dropped ({{reason}})"),
               (f"sum by (ecosystem) (increase(ecoserve_outcomes_lost_total{{{E}}}{W}))", "lost in a crash ({{ecosystem}})")),
              unit="short"),
    PanelSpec("timeseries", "Telemetry cost: recorder CPU",
              "Share of one CPU core the recorder uses, by operation: storing and counting outcomes (record), "
              "applying labels (feedback), assumed labels and expiries (sweep). With the recorder in the gateway "
              "this comes out of the gateway's CPU. Bad: growing faster than traffic (the store is getting "
              "slower), or near the recorder's num_cpus.",
              ((f"sum by (operation) (rate(ecoserve_recorder_cpu_seconds_total{W}))", "{{operation}}"),),
              unit="percentunit"),
]

CK = 'ecosystem=~"$ecosystem",member=~"$member"'
CANDIDATE_LEGEND = "{{ecosystem}} {{member}} v{{version}} -> v{{candidate}}"
CANDIDATES = [
    PanelSpec("timeseries", "Candidate accuracy minus serving version's, with its 95% interval",
              "On the same labeled outcomes: the candidate version's accuracy minus the serving version's (a "
              "paired difference), since the candidate started, with its interval (dashed). Bad: the upper line "
              "below 0 (the candidate is worse).",
              _band("ecoserve_candidate_accuracy_delta", f"{CK},{ALL}", CANDIDATE_LEGEND),
              unit="percentunit", extra={"interval": True}),
    PanelSpec("timeseries", "Negative flip rate with its 95% interval",
              "Share of labeled outcomes the serving version gets right and the candidate wrong (regressions). A "
              "candidate can be better on average and still break what worked for someone. Bad: the lower line "
              "well above 0.",
              _band("ecoserve_candidate_negative_flip_ratio", f"{CK},{ALL}", CANDIDATE_LEGEND),
              extra={"interval": True}),
    PanelSpec("bargauge", "Negative flip rate by subgroup (95% lower bound)",
              "Where the candidate's regressions land: each declared subgroup's lower bound of its negative flip "
              "rate. Bad: one group far above the others (the alert fires above the configured threshold).",
              ((f'ecoserve_candidate_negative_flip_ratio_lower{{{CK},subgroup!="all"}}',
                "{{member}} v{{candidate}} {{subgroup}}={{subgroup_value}}"),),
              instant=True),
    PanelSpec("bargauge", "Accuracy difference by subgroup (95% upper bound)",
              "Each subgroup's upper bound of the candidate's accuracy minus the serving version's. Bad: below 0 "
              "for a group while the overall difference is above 0 (better on average, worse for them).",
              ((f'ecoserve_candidate_accuracy_delta_upper{{{CK},subgroup!="all"}}',
                "{{member}} v{{candidate}} {{subgroup}}={{subgroup_value}}"),),
              instant=True),
    PanelSpec("timeseries", "Share of improvements on systemic failures",
              "Of the outcomes the candidate fixes, the share every other deployed member also gets wrong: the "
              "people no model serves. Bad: near 0 (the new version's gains go to those already served well).",
              _band("ecoserve_candidate_improvements_on_systemic_failures_ratio", f"{CK},{ALL}", CANDIDATE_LEGEND),
              extra={"interval": True}),
    PanelSpec("timeseries", "Candidate agreement with the serving version (label-free)",
              "Share of outcomes where the candidate gave the serving version's output, before any label. Bad: "
              "a sudden drop (the candidate behaves differently from what was tested).",
              ((f"sum by (ecosystem, member, version, candidate) (increase(ecoserve_candidate_agreements_total{{{CK}}}{W})) "
                f"/ sum by (ecosystem, member, version, candidate) (increase(ecoserve_candidate_outcomes_total{{{CK}}}{W}))",
                CANDIDATE_LEGEND),)),
    PanelSpec("bargauge", "Pipelines: self-defeating improvements",
              "For a pipeline member whose candidate changes one stage: 1 when that stage is better on its own "
              "(95% lower bound of its accuracy difference above 0) and the whole chain is worse end to end (upper "
              "bound below 0). Bad: 1 (the alert fires after 30 minutes).",
              ((f"ecoserve_pipeline_self_defeating_improvement{{{CK}}}",
                "{{member}} v{{version}} -> v{{candidate}} ({{stage}} stage)"),),
              instant=True),
    PanelSpec("timeseries", "Pipelines: the changed stage alone vs the whole chain",
              "Accuracy difference (candidate minus serving version, same outcomes) of the changed stage on its "
              "own (member MEMBER.STAGE) and of the whole pipeline. Bad: the stage's line above 0 while the "
              "chain's is below (the stages after it were not trained on its new outputs).",
              ((f'ecoserve_candidate_accuracy_delta{{ecosystem=~"$ecosystem",member=~"[a-z0-9_]+[.][a-z0-9_]+",{ALL}}}',
                "{{ecosystem}} {{member}} v{{version}} -> v{{candidate}} (stage alone)"),
               (f"ecoserve_candidate_accuracy_delta{{{CK},{ALL}}} and on (ecosystem, member, version, candidate) "
                f"ecoserve_pipeline_self_defeating_improvement",
                "{{ecosystem}} {{member}} v{{version}} -> v{{candidate}} (whole chain)")),
              unit="percentunit"),
]

RK = 'ecosystem=~"$ecosystem"'
RANKING = [
    PanelSpec("timeseries", "Click-through of each member's lists, served, with its 95% interval",
              "Labeled outcomes with a click on a shown item, over the labeled outcomes whose list the member "
              "served, since the store began. Bad: a member far below the others, or falling.",
              _band("ecoserve_ranking_ctr_ratio", f"{RK},member=~\"$member\"", "{{ecosystem}} {{member}}"),
              extra={"interval": True}),
    PanelSpec("timeseries", "Off-policy click-through of every member (SNIPS), with its 95% interval",
              "What each member's list would get if it served every request in its own order, estimated from "
              "the randomized routing's logged propensities and corrected for position bias. Bad: the served "
              "member's estimate below another's (the policy serves the worse list), or intervals too wide to "
              "tell (too little exploration).",
              _band("ecoserve_ranking_snips_ctr_ratio", f"{RK},member=~\"$member\"", "{{ecosystem}} {{member}}"),
              extra={"interval": True}),
    PanelSpec("bargauge", "Position bias: examination by slot",
              "Clicks per slot on the rows whose list was shuffled, relative to the top slot: how much less a "
              "lower slot is looked at. Needs position_shuffle_rate > 0. Bad: no bars (no shuffled rows, so "
              "off-policy estimates are not corrected for position).",
              ((f"ecoserve_ranking_examination_ratio{{{RK}}}", "{{ecosystem}} slot {{slot}}"),), instant=True),
    PanelSpec("timeseries", "Catalogue coverage of each list",
              "Share of the catalogue that appeared in a member's lists, and in what was shown, over the window. "
              "Bad: falling round after round (a feedback loop narrowing what anyone sees).",
              ((f"ecoserve_ranking_coverage_ratio{{{RK}}}", "{{ecosystem}} {{list}}"),)),
    PanelSpec("timeseries", "Exposure concentration (Gini) of each list",
              "Gini coefficient of how often each item appears, over the window: 0 = every item equally, "
              "toward 1 = a few items take all the exposure. Bad: rising.",
              ((f"ecoserve_ranking_exposure_gini{{{RK}}}", "{{ecosystem}} {{list}}"),), unit="none"),
    PanelSpec("timeseries", "Popularity bias: ARP and long-tail share",
              "ARP: mean popularity (share of all clicks) of listed items; APLT: share of listed items outside "
              "the head (the most-clicked items taking 20% of clicks). Bad: ARP rising while APLT falls (lists "
              "converge on the popular items).",
              ((f"ecoserve_ranking_average_popularity_ratio{{{RK}}}", "{{ecosystem}} {{list}} ARP"),
               (f"ecoserve_ranking_long_tail_ratio{{{RK}}}", "{{ecosystem}} {{list}} APLT"))),
    PanelSpec("bargauge", "Overlap@k between members' lists",
              "Mean share of one member's top-k also in another's, over the window. Bad: near 1 for every pair "
              "(the members recommend the same items: a miss by one is a miss by all).",
              ((f"ecoserve_ranking_overlap_ratio{{{RK}}}", "{{ecosystem}} {{member}} & {{other}}"),), instant=True),
    PanelSpec("timeseries", "Systemic miss rate",
              "Share of clicks on an item that was in no member's list (the ecosystem's systemic failure, for "
              "ranking). Bad: high or rising (what people want is something no member offers).",
              ((_ratio(f'ecoserve_systemic_failures_total{{{RK},source="observed",{ALL}}}',
                       f'ecoserve_labeled_outcomes_total{{{RK},source="observed",{ALL}}}'), "{{ecosystem}}"),)),
]

DASHBOARDS: dict[str, tuple[str, list[PanelSpec]]] = {
    "ecoserve-overview": ("ecoserve / Ecosystem overview", OVERVIEW),
    "ecoserve-subgroups": ("ecoserve / Subgroups", SUBGROUPS),
    "ecoserve-labels": ("ecoserve / Labels and feedback loops", LABELS),
    "ecoserve-exploration": ("ecoserve / Exploration", EXPLORATION),
    "ecoserve-serving": ("ecoserve / Serving", SERVING),
    "ecoserve-candidates": ("ecoserve / Candidate versions", CANDIDATES),
    "ecoserve-ranking": ("ecoserve / Ranking and feedback loops", RANKING),
}


def _target(expr: str, legend: str, ref: str, instant: bool, fmt_table: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend or "__auto").ref_id(ref).datasource(DS)
    q = q.instant() if instant else q.range()
    if fmt_table:
        from grafana_foundation_sdk.models.prometheus import PromQueryFormat

        q = q.format(PromQueryFormat.TABLE)
    return q


def _panel(spec: PanelSpec) -> Any:
    kinds: dict[str, Any] = {"timeseries": timeseries.Panel, "stat": stat.Panel, "bargauge": bargauge.Panel,
             "table_matrix": table.Panel, "heatmap": heatmap.Panel}
    p = kinds[spec.kind]().title(spec.title).description(spec.description).datasource(DS)
    p = p.span(spec.width).height(spec.height)
    if spec.kind != "heatmap":
        p = p.unit(spec.unit)
    for i, (expr, legend) in enumerate(spec.queries):
        p = p.with_target(_target(expr, legend, chr(ord("A") + i), spec.instant, spec.kind == "table_matrix"))
    if spec.kind == "table_matrix":
        p = p.with_transformation(DataTransformerConfig(
            id_val="groupingToMatrix",
            options={"columnField": spec.extra["column"], "rowField": spec.extra["row"], "valueField": "Value"},
        ))
    if spec.kind == "heatmap":
        p = p.calculate(False)
    if spec.extra.get("interval"):  # interval ends: thin dashed lines beside the value
        p = p.override_by_regexp(".* (lower|upper)$", [
            DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [6, 4]}),
            DynamicConfigValue(id_val="custom.lineWidth", value=1),
        ])
    return p


def _variables() -> list[Any]:
    ds = dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    eco = (dashboard.QueryVariable("ecosystem").label("Ecosystem").datasource(DS)
           .query("label_values(ecoserve_outcomes_total, ecosystem)").multi(True).include_all(True)
           .all_value(".*").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))
    member = (dashboard.QueryVariable("member").label("Member").datasource(DS)
              .query('label_values(ecoserve_served_total{ecosystem=~"$ecosystem"}, member)').multi(True)
              .include_all(True).all_value(".*").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))
    subgroup = (dashboard.QueryVariable("subgroup").label("Subgroup").datasource(DS)
                .query('label_values(ecoserve_complete_outcomes_total{ecosystem=~"$ecosystem"}, subgroup)')
                .multi(True).include_all(True).all_value(".*").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))
    window = (dashboard.CustomVariable("window").label("Window").values("5m,15m,1h,6h,24h")
              .current(VariableOption(selected=True, text="1h", value="1h")))
    return [ds, eco, member, subgroup, window]


# JSON holds no comments: the dashboard's description says where it comes from
GENERATED = ("Generated by `ecoserve dashboards generate` (ecoserve/ops/dashboards.py); edit the source and "
             "regenerate, not this JSON.")


def build_dashboards() -> dict[str, dict[str, Any]]:
    out = {}
    for uid, (title, panels) in DASHBOARDS.items():
        d = (dashboard.Dashboard(title).uid(uid).tags(["ecoserve"]).refresh("30s").time("now-6h", "now")
             .timezone("browser").editable().description(GENERATED))
        for v in _variables():
            d = d.with_variable(v)
        for spec in panels:
            d = d.with_panel(_panel(spec))
        out[uid] = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    return out


def dashboard_json(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def write_dashboards(directory: str | Path) -> list[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid, d in build_dashboards().items():
        p = out / f"{uid}.json"
        p.write_text(dashboard_json(d))
        paths.append(p)
    return paths


def panel_queries(d: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(panel title, PromQL expression, instant) for every query of a dashboard."""
    out = []
    for panel in d.get("panels", []):
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"], bool(t.get("instant"))))
    return out
