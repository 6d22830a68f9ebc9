"""Every metric ecoserve exposes, declared in one place, produced at scrape time.

`EcoserveCollector` reads a `Recorder`'s additive state when Prometheus scrapes:
counters are the cumulative counts (rebuilt from the store after a restart, so
they never go down), and the derived `ecoserve_window_*` gauges are computed over
the recorder's rolling window from the same additive counts. Nothing is pushed
from the request path. Register it on an injected registry:

    registry = CollectorRegistry(); registry.register(EcoserveCollector(recorder))

Subgroup series carry `subgroup` (an attribute, or an intersection like
`sex&age_group`; `all` for the whole ecosystem) and `subgroup_value` (a declared
value, `other` for anything undeclared), so label values stay bounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from telemetry.counts import EcosystemCounts, group_keys
from telemetry.estimation import wilson
from telemetry.events import Event, EventCounts
from telemetry.flips import CandidateFlips
from telemetry.ranking import RankingCounts
from telemetry.recorder import DELAY_BUCKETS_S, SOURCES, EcosystemEstimates, EcosystemSnapshot, Recorder
from telemetry.serving_stats import LATENCY_BUCKETS_S
from telemetry.summary import summarize

__all__ = ["EcoserveCollector", "METRICS", "exposition"]

# name -> (type, labels, help). docs/metrics.md's table is kept equal to what this exports (a test).
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "ecoserve_outcomes_total": ("counter", ("ecosystem",), "Outcomes (served rows) recorded."),
    "ecoserve_outcomes_incomplete_total": ("counter", ("ecosystem",), "Outcomes where at least one member produced no output."),
    "ecoserve_member_missing_outputs_total": ("counter", ("ecosystem", "member"), "Outcomes where this member errored or timed out."),
    "ecoserve_served_total": ("counter", ("ecosystem", "member"), "Outcomes served by this member (after any fallback)."),
    "ecoserve_served_outputs_total": ("counter", ("ecosystem", "output"), "Outcomes by the output their caller received: the class (regression: the value's agreement bin)."),
    "ecoserve_served_propensity_total": ("counter", ("ecosystem", "member"), "Sum of the logged propensities of rows this member served as chosen (policy-routed rows)."),
    "ecoserve_fallbacks_total": ("counter", ("ecosystem", "member"), "Rows where this member was chosen but failed, and another served."),
    "ecoserve_explored_total": ("counter", ("ecosystem",), "Policy-routed rows served by a member other than the greedy one."),
    "ecoserve_direct_total": ("counter", ("ecosystem",), "Rows where the client addressed one member directly."),
    "ecoserve_predicted_total": ("counter", ("ecosystem", "subgroup", "subgroup_value"), "Outcomes where every member produced an output (denominator of label-free metrics)."),
    "ecoserve_unanimous_total": ("counter", ("ecosystem", "subgroup", "subgroup_value"), "Outcomes where every member predicted the same class."),
    "ecoserve_pair_agreements_total": ("counter", ("ecosystem", "member_a", "member_b", "subgroup", "subgroup_value"), "Outcomes where the two members predicted the same class."),
    "ecoserve_labeled_outcomes_total": ("counter", ("ecosystem", "source", "subgroup", "subgroup_value"), "Outcomes that received their first label."),
    "ecoserve_complete_outcomes_total": ("counter", ("ecosystem", "source", "subgroup", "subgroup_value"), "Labeled outcomes where every member's correctness is known (denominator of systemic failure)."),
    "ecoserve_failures_per_instance_total": ("counter", ("ecosystem", "source", "subgroup", "subgroup_value", "k"), "Complete labeled outcomes on which exactly k members failed (k = members: systemic failure)."),
    "ecoserve_systemic_failures_total": ("counter", ("ecosystem", "source", "subgroup", "subgroup_value"), "Complete labeled outcomes every member got wrong (k = members)."),
    "ecoserve_consistent_successes_total": ("counter", ("ecosystem", "source", "subgroup", "subgroup_value"), "Complete labeled outcomes every member got right (k = 0)."),
    "ecoserve_member_labeled_total": ("counter", ("ecosystem", "member", "source", "subgroup", "subgroup_value"), "Labeled outcomes where this member's correctness is known."),
    "ecoserve_member_correct_total": ("counter", ("ecosystem", "member", "source", "subgroup", "subgroup_value"), "Labeled outcomes this member got right."),
    "ecoserve_label_delay_seconds": ("histogram", ("ecosystem", "source"), "Label time minus prediction time, for each first label."),
    "ecoserve_label_corrections_total": ("counter", ("ecosystem", "from_source", "to_source"), "Labels that differed from the outcome's existing label (kept in the label history)."),
    "ecoserve_labels_duplicate_total": ("counter", ("ecosystem",), "Labels identical to the outcome's existing label (ignored)."),
    "ecoserve_feedback_unknown_id_total": ("counter", (), "Labels whose request id had no stored outcome on arrival (held as pending)."),
    "ecoserve_labels_expired_total": ("counter", (), "Pending labels dropped after their TTL without an outcome."),
    "ecoserve_labels_rejected_total": ("counter", ("reason",), "Pending labels dropped when their outcome arrived: its ecosystem cannot take them (reason=label, e.g. a class of another ecosystem) or the token that posted them did not cover it (reason=scope)."),
    "ecoserve_labels_pending": ("gauge", (), "Labels waiting for their outcome."),
    "ecoserve_outcomes_unknown_ecosystem_total": ("counter", (), "Outcome records handed over for an ecosystem this recorder does not serve (not stored)."),
    "ecoserve_outcomes_dropped_total": ("counter", ("reason",), "Outcome records not stored, by reason: queue_full (a gateway's queue was full: the recorder down or slower than traffic), invalid (the store refused the record: a data error; the rest of its hand-over was stored)."),
    "ecoserve_handover_failures_total": ("counter", (), "Hand-overs of outcome records the recorder could not store for a reason a retry may cure (the store unreachable, a full disk); their records stay queued at the gateway and are sent again."),
    "ecoserve_store_up": ("gauge", (), "1 while the outcome store answers its periodic check and accepts writes, else 0 (records wait at the gateways; labels get 503)."),
    "ecoserve_store_down_since_timestamp_seconds": ("gauge", (), "Unix time the outcome store started failing; 0 while it is up."),
    "ecoserve_handover_failing": ("gauge", (), "1 while the latest hand-over failed (records are waiting at the gateways), else 0."),
    "ecoserve_handover_failing_since_timestamp_seconds": ("gauge", (), "Unix time of the first failure of the current run of failed hand-overs; 0 while hand-overs succeed."),
    "ecoserve_outcomes_lost_total": ("counter", ("ecosystem",), "Outcome records a gateway replica accepted and never handed over because it crashed (counted from its ledger once it is found dead)."),
    "ecoserve_recorder_cpu_seconds_total": ("counter", ("operation",), "CPU time the recorder spent storing and counting, in the threads that did it (operation: record, feedback, sweep): the telemetry's own cost. Since the recorder started."),
    "ecoserve_outcomes_duplicate_id_total": ("counter", (), "Outcome records whose request id was already stored (retries; clients reusing ids)."),
    "ecoserve_requests_total": ("counter", ("ecosystem", "code"), "Inference requests by HTTP status, counted at the gateways."),
    "ecoserve_member_latency_seconds": ("histogram", ("ecosystem", "member", "provider"), "Time of one member call (one batch), at the gateway."),
    "ecoserve_member_errors_total": ("counter", ("ecosystem", "member", "kind"), "Member calls that failed (kind: error, timeout)."),
    "ecoserve_label_coverage_ratio": ("gauge", ("ecosystem", "age_seconds"), "Share of outcomes older than age_seconds that have a label."),
    "ecoserve_candidate_outcomes_total": ("counter", ("ecosystem", "member", "version", "candidate"), "Outcomes on which the candidate version ran in shadow of the member's serving version."),
    "ecoserve_candidate_agreements_total": ("counter", ("ecosystem", "member", "version", "candidate"), "Of those, outcomes where the candidate gave the serving version's output (label-free; regression: the same bin)."),
    "ecoserve_candidate_labeled_total": ("counter", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Labeled outcomes where both the serving version's and the candidate's correctness are known (first labels)."),
    "ecoserve_candidate_current_correct_total": ("counter", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Of those, outcomes the serving version got right."),
    "ecoserve_candidate_correct_total": ("counter", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Of those, outcomes the candidate got right."),
    "ecoserve_candidate_improvements_total": ("counter", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Outcomes the serving version got wrong and the candidate right (positive flips)."),
    "ecoserve_candidate_regressions_total": ("counter", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Outcomes the serving version got right and the candidate wrong (negative flips)."),
    "ecoserve_candidate_improvements_on_systemic_failures_total": ("counter", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Improvements on outcomes every other deployed member also got wrong (the deployed ecosystem failed them systemically)."),
    "ecoserve_candidate_negative_flip_ratio": ("gauge", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Negative flip rate: regressions / labeled outcomes, since the candidate started."),
    "ecoserve_candidate_negative_flip_ratio_lower": ("gauge", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Lower end of the 95% Wilson interval of ecoserve_candidate_negative_flip_ratio."),
    "ecoserve_candidate_negative_flip_ratio_upper": ("gauge", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Upper end of the 95% Wilson interval of ecoserve_candidate_negative_flip_ratio."),
    "ecoserve_candidate_accuracy_delta": ("gauge", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "The candidate's accuracy minus the serving version's on the same labeled outcomes."),
    "ecoserve_candidate_accuracy_delta_lower": ("gauge", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Lower end of the 95% paired normal interval of ecoserve_candidate_accuracy_delta."),
    "ecoserve_candidate_accuracy_delta_upper": ("gauge", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Upper end of the 95% paired normal interval of ecoserve_candidate_accuracy_delta."),
    "ecoserve_candidate_improvements_on_systemic_failures_ratio": ("gauge", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Share of the candidate's improvements that land on systemic failures of the deployed ecosystem."),
    "ecoserve_candidate_improvements_on_systemic_failures_ratio_lower": ("gauge", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Lower end of the 95% Wilson interval of ecoserve_candidate_improvements_on_systemic_failures_ratio."),
    "ecoserve_candidate_improvements_on_systemic_failures_ratio_upper": ("gauge", ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value"), "Upper end of the 95% Wilson interval of ecoserve_candidate_improvements_on_systemic_failures_ratio."),
    "ecoserve_pipeline_self_defeating_improvement": ("gauge", ("ecosystem", "member", "version", "candidate", "stage"), "1 when a pipeline candidate's changed stage is better on its own (its accuracy delta's 95% lower bound > 0) while the chain is worse end to end (the member's delta's upper bound < 0); else 0. The stage's own flips are the candidate metrics of member \"MEMBER.STAGE\"."),
    "ecoserve_ranking_ctr_ratio": ("gauge", ("ecosystem", "member"), "Ranking: click-through of the lists a member served: labeled outcomes with a click on a shown item / labeled outcomes it served."),
    "ecoserve_ranking_ctr_ratio_lower": ("gauge", ("ecosystem", "member"), "Lower end of the 95% Wilson interval of ecoserve_ranking_ctr_ratio."),
    "ecoserve_ranking_ctr_ratio_upper": ("gauge", ("ecosystem", "member"), "Upper end of the 95% Wilson interval of ecoserve_ranking_ctr_ratio."),
    "ecoserve_ranking_served_labeled_total": ("counter", ("ecosystem", "member"), "Ranking: labeled outcomes (a click or no click) whose list the member served."),
    "ecoserve_ranking_served_clicks_total": ("counter", ("ecosystem", "member"), "Ranking: of those, outcomes with a click on a shown item."),
    "ecoserve_ranking_slot_labeled_total": ("counter", ("ecosystem", "slot"), "Ranking: labeled outcomes with a shown item in this slot (1 = top)."),
    "ecoserve_ranking_slot_clicks_total": ("counter", ("ecosystem", "slot"), "Ranking: clicks on the item shown in this slot (position bias: clicks by slot on shuffled lists)."),
    "ecoserve_ranking_coverage_ratio": ("gauge", ("ecosystem", "list"), "Ranking: share of the catalogue that appeared in the list (a member's top-k, or \"shown\"), over the rolling window (telemetry.window_s)."),
    "ecoserve_ranking_exposure_gini": ("gauge", ("ecosystem", "list"), "Ranking: Gini coefficient of how often each catalogue item appeared in the list (0: evenly; toward 1: a few items take all)."),
    "ecoserve_ranking_average_popularity_ratio": ("gauge", ("ecosystem", "list"), "Ranking: ARP, the mean popularity (share of all clicks since the store began) of the items in the list, over the rolling window."),
    "ecoserve_ranking_long_tail_ratio": ("gauge", ("ecosystem", "list"), "Ranking: APLT, the share of listed items outside the head (the most-clicked items taking 20% of clicks since the store began), over the rolling window."),
    "ecoserve_ranking_overlap_ratio": ("gauge", ("ecosystem", "member", "other"), "Ranking: mean overlap@k of two members' lists, |A & B| / k, over outcomes where both gave one."),
    "ecoserve_ranking_examination_ratio": ("gauge", ("ecosystem", "slot"), "Ranking: estimated examination probability of each slot relative to the top one (position bias), from the rows whose lists were shuffled."),
    "ecoserve_ranking_ips_ctr_ratio": ("gauge", ("ecosystem", "member"), "Ranking: IPS estimate of the click-through the member's list would get if it served every request in its own order (position-bias corrected)."),
    "ecoserve_ranking_ips_ctr_ratio_lower": ("gauge", ("ecosystem", "member"), "Lower end of the 95% normal interval of ecoserve_ranking_ips_ctr_ratio."),
    "ecoserve_ranking_ips_ctr_ratio_upper": ("gauge", ("ecosystem", "member"), "Upper end of the 95% normal interval of ecoserve_ranking_ips_ctr_ratio."),
    "ecoserve_ranking_snips_ctr_ratio": ("gauge", ("ecosystem", "member"), "Ranking: SNIPS (self-normalized) estimate of the same click-through."),
    "ecoserve_ranking_snips_ctr_ratio_lower": ("gauge", ("ecosystem", "member"), "Lower end of the 95% delta-method interval of ecoserve_ranking_snips_ctr_ratio."),
    "ecoserve_ranking_snips_ctr_ratio_upper": ("gauge", ("ecosystem", "member"), "Upper end of the 95% delta-method interval of ecoserve_ranking_snips_ctr_ratio."),
    "ecoserve_window_seconds": ("gauge", (), "Length of the rolling window of the ecoserve_window_* gauges."),
    "ecoserve_window_labeled_outcomes": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Complete labeled outcomes in the window."),
    "ecoserve_window_systemic_failure_ratio": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Share of complete labeled outcomes every member got wrong."),
    "ecoserve_window_systemic_failure_baseline_ratio": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Systemic failure rate if members failed independently: product of their error rates."),
    "ecoserve_window_systemic_failure_excess_ratio": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Systemic failure rate minus its independence baseline."),
    "ecoserve_window_systemic_failure_ratio_lower": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Lower end of the systemic failure rate's 95% Wilson interval."),
    "ecoserve_window_systemic_failure_ratio_upper": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Upper end of the systemic failure rate's 95% Wilson interval."),
    "ecoserve_window_systemic_failure_excess_ratio_lower": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Lower end of the excess: the systemic failure rate's Wilson lower bound minus its independence baseline (the alerts use this: a small group does not page on noise)."),
    "ecoserve_window_consistent_success_ratio_lower": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Lower end of the consistent success rate's 95% Wilson interval."),
    "ecoserve_window_consistent_success_ratio_upper": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Upper end of the consistent success rate's 95% Wilson interval."),
    "ecoserve_window_unanimity_ratio_lower": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Lower end of the unanimity rate's 95% Wilson interval."),
    "ecoserve_window_unanimity_ratio_upper": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Upper end of the unanimity rate's 95% Wilson interval."),
    "ecoserve_window_member_accuracy_ratio_lower": ("gauge", ("ecosystem", "member"), "Lower end of the member accuracy's 95% Wilson interval."),
    "ecoserve_window_member_accuracy_ratio_upper": ("gauge", ("ecosystem", "member"), "Upper end of the member accuracy's 95% Wilson interval."),
    "ecoserve_window_consistent_success_ratio": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Share of complete labeled outcomes every member got right."),
    "ecoserve_window_unanimity_ratio": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Share of outcomes where every member agreed (label-free)."),
    "ecoserve_window_failures_per_instance_ratio": ("gauge", ("ecosystem", "k", "kind"), "Distribution of failures per instance: observed, and independent (Poisson-binomial)."),
    "ecoserve_window_member_accuracy_ratio": ("gauge", ("ecosystem", "member"), "Member accuracy on labeled outcomes in the window."),
    "ecoserve_window_kappa": ("gauge", ("ecosystem", "member_a", "member_b"), "Cohen's kappa between two members (label-free)."),
    "ecoserve_window_agreement_ratio": ("gauge", ("ecosystem", "member_a", "member_b"), "Share of outcomes where two members agreed (label-free)."),
    "ecoserve_window_ambiguity_ratio": ("gauge", ("ecosystem",), "Share of outcomes where some near-best member disagrees with the reference member."),
    "ecoserve_window_discrepancy_ratio": ("gauge", ("ecosystem",), "Largest share of outcomes on which one near-best member disagrees with the reference."),
    "ecoserve_window_cie_ratio": ("gauge", ("ecosystem",), "Share of outcomes that are compression-identified exemplars."),
    "ecoserve_window_ips": ("gauge", ("ecosystem", "member"), "Inverse-propensity estimate of serving this member (mean reward)."),
    "ecoserve_window_snips": ("gauge", ("ecosystem", "member"), "Self-normalized IPS estimate of serving this member."),
    "ecoserve_window_ips_lower": ("gauge", ("ecosystem", "member"), "Lower end of the IPS estimate's 95% normal interval (from additive sums)."),
    "ecoserve_window_ips_upper": ("gauge", ("ecosystem", "member"), "Upper end of the IPS estimate's 95% normal interval."),
    "ecoserve_window_snips_lower": ("gauge", ("ecosystem", "member"), "Lower end of the SNIPS estimate's 95% interval (delta method)."),
    "ecoserve_window_snips_upper": ("gauge", ("ecosystem", "member"), "Upper end of the SNIPS estimate's 95% interval (delta method)."),
    "ecoserve_window_effective_sample_size": ("gauge", ("ecosystem", "member"), "Effective sample size of the IPS weights."),
    "ecoserve_window_min_propensity": ("gauge", ("ecosystem",), "Smallest logged propensity among labeled policy-routed rows (positivity)."),
    "ecoserve_estimated_systemic_failure_ratio": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Estimated share of the window's outcomes still waiting for labels on which every member is wrong (label-free; docs/design.md)."),
    "ecoserve_estimated_systemic_failure_ratio_lower": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Lower end of its 95% interval."),
    "ecoserve_estimated_systemic_failure_ratio_upper": ("gauge", ("ecosystem", "subgroup", "subgroup_value"), "Upper end of its 95% interval."),
    "ecoserve_estimated_accuracy_ratio": ("gauge", ("ecosystem", "member"), "Estimated accuracy of a member on the outcomes still waiting for labels (its mean calibrated score)."),
    "ecoserve_estimated_accuracy_ratio_lower": ("gauge", ("ecosystem", "member"), "Lower end of its 95% interval."),
    "ecoserve_estimated_accuracy_ratio_upper": ("gauge", ("ecosystem", "member"), "Upper end of its 95% interval."),
    "ecoserve_estimated_outcomes": ("gauge", ("ecosystem",), "Outcomes of the window still waiting for labels that the estimates cover."),
    "ecoserve_estimator_version": ("gauge", ("ecosystem",), "Version of the fitted label-free estimator (kept in the store)."),
    "ecoserve_estimator_fitted_timestamp_seconds": ("gauge", ("ecosystem",), "When the estimator was fitted."),
    "ecoserve_estimator_reference_outcomes": ("gauge", ("ecosystem",), "Labeled outcomes it was fitted on."),
    "ecoserve_estimator_reference_systemic_failure_ratio": ("gauge", ("ecosystem",), "The realized systemic failure rate of those reference outcomes."),
    "ecoserve_estimator_error": ("gauge", ("ecosystem",), "|estimated - realized| systemic failure rate on outcomes it estimated whose labels arrived after it was fitted (how good it has been)."),
    "ecoserve_estimator_checked_outcomes": ("gauge", ("ecosystem",), "Outcomes that error was measured on."),
    "ecoserve_window_served_output_entropy": ("gauge", ("ecosystem",), "Entropy (base 2) of the distribution of served outputs predicted in the window; a fall means fewer outputs reach callers (degenerate feedback loops)."),
}


def _family(name: str) -> Any:  # the concrete *MetricFamily: add_metric differs per type
    kind, labels, doc = METRICS[name]
    base = name.removesuffix("_total") if kind == "counter" else name
    if kind == "counter":
        return CounterMetricFamily(base, doc, labels=list(labels))
    if kind == "histogram":
        return HistogramMetricFamily(name, doc, labels=list(labels))
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _cumulative(bounds: tuple[float, ...], buckets: list[int]) -> list[tuple[str, int]]:
    """A histogram's per-bucket counts as Prometheus' cumulative (le, count) pairs, +Inf last."""
    cum, acc = [], 0
    for bound, n in zip([*bounds, math.inf], buckets):
        acc += n
        cum.append(("+Inf" if math.isinf(bound) else f"{bound:g}", acc))
    return cum


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _subgroups(counts: EcosystemCounts) -> Iterator[tuple[str, str, EcosystemCounts]]:
    yield "all", "all", counts
    for key, _attrs in group_keys(counts.shape):
        for value, sub in sorted(counts.groups.get(key, {}).items()):
            yield key, value, sub


class EcoserveCollector(Collector):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterator[Metric]:
        snap = self.recorder.snapshot()
        fams: dict[str, Any] = {name: _family(name) for name in METRICS}
        for eco, st in snap.ecosystems.items():
            self._ecosystem(fams, eco, st, snap.events)
            if eco in snap.estimates:
                self._estimates(fams, eco, st.spec.members, snap.estimates[eco])
            if st.flips is not None:
                self._flips(fams, eco, st.flips)
            if st.ranking is not None and st.ranking_window is not None:
                self._ranking(fams, eco, st.ranking, st.ranking_window)
        events = snap.events
        fams["ecoserve_feedback_unknown_id_total"].add_metric([], events[Event.UNKNOWN_IDS])
        fams["ecoserve_labels_expired_total"].add_metric([], events[Event.EXPIRED])
        fams["ecoserve_labels_rejected_total"].add_metric(["label"], events[Event.PENDING_REJECTED])
        fams["ecoserve_labels_rejected_total"].add_metric(["scope"], events[Event.PENDING_OUT_OF_SCOPE])
        fams["ecoserve_outcomes_unknown_ecosystem_total"].add_metric([], events[Event.UNKNOWN_ECOSYSTEM])
        fams["ecoserve_labels_pending"].add_metric([], snap.pending)
        fams["ecoserve_outcomes_duplicate_id_total"].add_metric([], events[Event.DUPLICATE_OUTCOME_IDS])
        for reason in ("queue_full", "invalid"):
            fams["ecoserve_outcomes_dropped_total"].add_metric([reason], snap.dropped.get(reason, 0))
        fams["ecoserve_handover_failures_total"].add_metric([], snap.handover_failures)
        down = snap.store_down_since
        fams["ecoserve_store_up"].add_metric([], 1 if down is None else 0)
        fams["ecoserve_store_down_since_timestamp_seconds"].add_metric([], down or 0.0)
        since = snap.handover_failing_since
        fams["ecoserve_handover_failing"].add_metric([], 0 if since is None else 1)
        fams["ecoserve_handover_failing_since_timestamp_seconds"].add_metric([], since or 0.0)
        fams["ecoserve_window_seconds"].add_metric([], snap.window_s)
        for op, cpu in snap.cpu_s.items():
            fams["ecoserve_recorder_cpu_seconds_total"].add_metric([op], cpu)
        serving = snap.serving
        for key, v in sorted(serving["requests"].items()):
            fams["ecoserve_requests_total"].add_metric(key.split("|"), v)
        for key, v in sorted(serving["errors"].items()):
            fams["ecoserve_member_errors_total"].add_metric(key.split("|"), v)
        for key, (buckets, total) in sorted(serving["latency"].items()):
            fams["ecoserve_member_latency_seconds"].add_metric(key.split("|"), _cumulative(LATENCY_BUCKETS_S, buckets), total)
        for eco, by_age in snap.coverage.items():
            for age in snap.coverage_ages_s:
                total, labeled = by_age[age]
                if total:
                    fams["ecoserve_label_coverage_ratio"].add_metric([eco, f"{age:g}"], labeled / total)
        yield from fams.values()

    @staticmethod
    def _flips(fams: dict[str, Any], eco: str, flips: CandidateFlips) -> None:
        for (member, version, cand), (ran, agreed) in sorted(flips.recorded.items()):
            fams["ecoserve_candidate_outcomes_total"].add_metric([eco, member, version, cand], int(ran))
            fams["ecoserve_candidate_agreements_total"].add_metric([eco, member, version, cand], int(agreed))
        for (member, version, cand), sg, value, c in flips.rows():
            labels = [eco, member, version, cand, sg, value]
            fams["ecoserve_candidate_labeled_total"].add_metric(labels, c["n"])
            fams["ecoserve_candidate_current_correct_total"].add_metric(labels, c["current_correct"])
            fams["ecoserve_candidate_correct_total"].add_metric(labels, c["candidate_correct"])
            fams["ecoserve_candidate_improvements_total"].add_metric(labels, c["improvements"])
            fams["ecoserve_candidate_regressions_total"].add_metric(labels, c["regressions"])
            fams["ecoserve_candidate_improvements_on_systemic_failures_total"].add_metric(
                labels, c["improvements_on_systemic"])
            for name, r in CandidateFlips.ratios(c).items():
                if r is None:
                    continue
                base = {"negative_flip": "ecoserve_candidate_negative_flip_ratio",
                        "accuracy_delta": "ecoserve_candidate_accuracy_delta",
                        "improvements_on_systemic_failures":
                            "ecoserve_candidate_improvements_on_systemic_failures_ratio"}[name]
                for suffix, v in zip(("", "_lower", "_upper"), r):
                    fams[base + suffix].add_metric(labels, v)
        for (member, version, cand), stage, flagged, _stage, _chain in flips.self_defeating():
            fams["ecoserve_pipeline_self_defeating_improvement"].add_metric([eco, member, version, cand, stage],
                                                                            int(flagged))

    @staticmethod
    def _ranking(fams: dict[str, Any], eco: str, r: RankingCounts, window: RankingCounts) -> None:
        """Click-through, slots and estimates since the store began; catalogue metrics and overlap
        over the rolling window."""
        for a, member in enumerate(r.members):
            n, clicks = int(r.served_labeled[a]), int(r.served_clicks[a])
            fams["ecoserve_ranking_served_labeled_total"].add_metric([eco, member], n)
            fams["ecoserve_ranking_served_clicks_total"].add_metric([eco, member], clicks)
            if n:
                lo, hi = wilson(clicks, n)
                for suffix, v in (("", clicks / n), ("_lower", float(lo)), ("_upper", float(hi))):
                    fams[f"ecoserve_ranking_ctr_ratio{suffix}"].add_metric([eco, member], v)
            for b, other in enumerate(window.members):
                if b != a and window.pairs[a, b]:
                    fams["ecoserve_ranking_overlap_ratio"].add_metric([eco, member, other],
                                                                      float(window.overlap[a, b] / window.pairs[a, b]))
        for slot in range(r.k):
            fams["ecoserve_ranking_slot_labeled_total"].add_metric([eco, str(slot + 1)], int(r.slot_labeled[slot]))
            fams["ecoserve_ranking_slot_clicks_total"].add_metric([eco, str(slot + 1)], int(r.slot_clicks[slot]))
        names = {"coverage": "ecoserve_ranking_coverage_ratio", "gini": "ecoserve_ranking_exposure_gini",
                 "arp": "ecoserve_ranking_average_popularity_ratio", "aplt": "ecoserve_ranking_long_tail_ratio"}
        theta = r.examination()
        if theta is not None:
            for slot in range(r.k):
                fams["ecoserve_ranking_examination_ratio"].add_metric([eco, str(slot + 1)], float(theta[slot]))
        for member, est in r.estimates().items():
            for base in ("ips", "snips"):
                if est[base] is None:
                    continue
                for suffix in ("", "_lower", "_upper"):
                    fams[f"ecoserve_ranking_{base}_ctr_ratio{suffix}"].add_metric([eco, member], est[base + suffix])
        for lst, values in window.catalogue(r.clicks_item).items():
            for key, val in values.items():
                if val is not None:
                    fams[names[key]].add_metric([eco, lst], val)

    @staticmethod
    def _estimates(fams: dict[str, Any], eco: str, members: tuple[str, ...], e: EcosystemEstimates) -> None:
        fams["ecoserve_estimated_outcomes"].add_metric([eco], e.n)
        fams["ecoserve_estimator_version"].add_metric([eco], e.version)
        fams["ecoserve_estimator_fitted_timestamp_seconds"].add_metric([eco], e.fitted_at)
        fams["ecoserve_estimator_reference_outcomes"].add_metric([eco], e.n_fit)
        fams["ecoserve_estimator_reference_systemic_failure_ratio"].add_metric([eco], e.base_rate)
        if e.error is not None:
            fams["ecoserve_estimator_error"].add_metric([eco], e.error)
            fams["ecoserve_estimator_checked_outcomes"].add_metric([eco], e.checked)
        for (sg, value), est in sorted(e.systemic.items()):
            for suffix, v in (("", est.value), ("_lower", est.lower), ("_upper", est.upper)):
                fams[f"ecoserve_estimated_systemic_failure_ratio{suffix}"].add_metric([eco, sg, value], v)
        for member, est in zip(members, e.accuracy):
            if est.n:
                for suffix, v in (("", est.value), ("_lower", est.lower), ("_upper", est.upper)):
                    fams[f"ecoserve_estimated_accuracy_ratio{suffix}"].add_metric([eco, member], v)

    def _ecosystem(self, fams: dict[str, Any], eco: str, st: EcosystemSnapshot, events: EventCounts) -> None:
        spec = st.spec
        members = spec.members
        fams["ecoserve_outcomes_total"].add_metric([eco], st.outcomes)
        fams["ecoserve_outcomes_incomplete_total"].add_metric([eco], st.incomplete)
        fams["ecoserve_outcomes_lost_total"].add_metric([eco], events.lost[eco])
        fams["ecoserve_explored_total"].add_metric([eco], st.explored)
        fams["ecoserve_direct_total"].add_metric([eco], st.direct)
        fams["ecoserve_labels_duplicate_total"].add_metric([eco], events.duplicates[eco])
        for (e, src, dst), v in sorted(events.corrections.items()):
            if e == eco:
                fams["ecoserve_label_corrections_total"].add_metric([eco, src, dst], v)
        for a, m in enumerate(members):
            fams["ecoserve_member_missing_outputs_total"].add_metric([eco, m], int(st.missing[a]))
            fams["ecoserve_served_total"].add_metric([eco, m], int(st.served[a]))
            fams["ecoserve_served_propensity_total"].add_metric([eco, m], float(st.served_propensity[a]))
            fams["ecoserve_fallbacks_total"].add_metric([eco, m], int(st.fallbacks[a]))
        for name, v in zip(st.spec.classes, st.served_outputs.tolist()):
            fams["ecoserve_served_outputs_total"].add_metric([eco, name], v)
        for sg, value, c in _subgroups(st.predictions):
            fams["ecoserve_predicted_total"].add_metric([eco, sg, value], c.n_predicted)
            fams["ecoserve_unanimous_total"].add_metric([eco, sg, value], c.unanimous)
            for a in range(len(members)):
                for b in range(a + 1, len(members)):
                    fams["ecoserve_pair_agreements_total"].add_metric(
                        [eco, members[a], members[b], sg, value], int(c.agree[a, b])
                    )
        for source in SOURCES:
            for sg, value, c in _subgroups(st.labels[source]):
                fams["ecoserve_labeled_outcomes_total"].add_metric([eco, source, sg, value], c.n_labeled)
                fams["ecoserve_complete_outcomes_total"].add_metric([eco, source, sg, value], c.n_complete)
                fams["ecoserve_systemic_failures_total"].add_metric([eco, source, sg, value], int(c.k_hist[-1]))
                fams["ecoserve_consistent_successes_total"].add_metric([eco, source, sg, value], int(c.k_hist[0]))
                for k in range(len(members) + 1):
                    fams["ecoserve_failures_per_instance_total"].add_metric(
                        [eco, source, sg, value, str(k)], int(c.k_hist[k])
                    )
                for a, m in enumerate(members):
                    fams["ecoserve_member_labeled_total"].add_metric([eco, m, source, sg, value], int(c.member_n[a]))
                    fams["ecoserve_member_correct_total"].add_metric(
                        [eco, m, source, sg, value], int(c.member_correct[a])
                    )
            buckets, total = st.delay[source]
            fams["ecoserve_label_delay_seconds"].add_metric([eco, source], _cumulative(DELAY_BUCKETS_S, buckets.tolist()), total)
        self._window(fams, eco, st)

    def _window(self, fams: dict[str, Any], eco: str, st: EcosystemSnapshot) -> None:
        counts, exploration = st.window
        members = st.spec.members
        for sg, value, c in _subgroups(counts):
            s = summarize(c, include_groups=False)
            labels = [eco, sg, value]
            fams["ecoserve_window_labeled_outcomes"].add_metric(labels, c.n_complete)
            pairs = (
                ("ecoserve_window_systemic_failure_ratio", s["systemic_failure_rate"]),
                ("ecoserve_window_systemic_failure_baseline_ratio", s["independence_baseline"]["systemic_failure_rate"]),
                ("ecoserve_window_systemic_failure_excess_ratio", s["homogeneity_excess"]["systemic_failure_rate"]),
                ("ecoserve_window_consistent_success_ratio", s["consistent_success_rate"]),
                ("ecoserve_window_unanimity_ratio", s["unanimity_rate"]),
            )
            for name, v in pairs:
                if _finite(v):
                    fams[name].add_metric(labels, v)
            # 95% Wilson intervals: how sure each ratio is (a group of 30 outcomes is not one of 30,000)
            for name, v, n in (("ecoserve_window_systemic_failure_ratio", s["systemic_failure_rate"], c.n_complete),
                               ("ecoserve_window_consistent_success_ratio", s["consistent_success_rate"], c.n_complete),
                               ("ecoserve_window_unanimity_ratio", s["unanimity_rate"], c.n_predicted)):
                if _finite(v) and n:
                    lo, hi = wilson(round(v * n), n)
                    fams[f"{name}_lower"].add_metric(labels, float(lo))
                    fams[f"{name}_upper"].add_metric(labels, float(hi))
                    if name == "ecoserve_window_systemic_failure_ratio":
                        base = s["independence_baseline"]["systemic_failure_rate"]
                        if _finite(base):
                            fams["ecoserve_window_systemic_failure_excess_ratio_lower"].add_metric(labels, float(lo) - base)
            if sg != "all":
                continue
            fpi = s["failures_per_instance"]
            if fpi["observed"] is not None:
                for kind in ("observed", "independent"):
                    for k, v in enumerate(fpi[kind]):
                        fams["ecoserve_window_failures_per_instance_ratio"].add_metric([eco, str(k), kind], v)
            for a, (m, v) in enumerate(s["accuracy"].items()):
                if _finite(v):
                    fams["ecoserve_window_member_accuracy_ratio"].add_metric([eco, m], v)
                    n_a = int(c.member_n[a])
                    if n_a:
                        lo, hi = wilson(int(c.member_correct[a]), n_a)
                        fams["ecoserve_window_member_accuracy_ratio_lower"].add_metric([eco, m], float(lo))
                        fams["ecoserve_window_member_accuracy_ratio_upper"].add_metric([eco, m], float(hi))
            for a, ma in enumerate(members):
                for b, mb in enumerate(members):
                    if a == b:
                        continue
                    if _finite(s["kappa"][ma][mb]):
                        fams["ecoserve_window_kappa"].add_metric([eco, ma, mb], s["kappa"][ma][mb])
                    if _finite(s["agreement"][ma][mb]):
                        fams["ecoserve_window_agreement_ratio"].add_metric([eco, ma, mb], s["agreement"][ma][mb])
            for name, key in (("ecoserve_window_ambiguity_ratio", "ambiguity"),
                              ("ecoserve_window_discrepancy_ratio", "discrepancy"),
                              ("ecoserve_window_cie_ratio", "cie_rate")):
                if _finite(s[key]):
                    fams[name].add_metric([eco], s[key])
        ex = exploration.summary(rewards_in_unit=st.spec.label_mode != "bandit")
        for m, v in ex["members"].items():
            for name, key in (("ecoserve_window_ips", "ips"), ("ecoserve_window_snips", "snips"),
                              ("ecoserve_window_ips_lower", "ips_lower"), ("ecoserve_window_ips_upper", "ips_upper"),
                              ("ecoserve_window_snips_lower", "snips_lower"),
                              ("ecoserve_window_snips_upper", "snips_upper"),
                              ("ecoserve_window_effective_sample_size", "effective_sample_size")):
                if _finite(v[key]):
                    fams[name].add_metric([eco, m], v[key])
        if _finite(ex["min_propensity"]):
            fams["ecoserve_window_min_propensity"].add_metric([eco], ex["min_propensity"])
        if _finite(ex["served_output_entropy_bits"]):
            fams["ecoserve_window_served_output_entropy"].add_metric([eco], ex["served_output_entropy_bits"])


def exposition(recorder: Recorder) -> bytes:
    """The Prometheus text exposition of a recorder's metrics (a fresh registry per call)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EcoserveCollector(recorder))
    return generate_latest(registry)


def metrics_markdown() -> str:
    """The metrics table of docs/metrics.md."""
    lines = ["| name | type | labels | meaning |", "| --- | --- | --- | --- |"]
    for name, (kind, labels, doc) in METRICS.items():
        lines.append(f"| `{name}` | {kind} | {', '.join(labels) or '-'} | {doc} |")
    return "\n".join(lines) + "\n"
