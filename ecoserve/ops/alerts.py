"""Prometheus alert rules, generated from one source: the rules file (`k8s/base/prometheus/
ecoserve-rules.yaml`, loaded by `make demo`'s Prometheus) and the `PrometheusRule` in `k8s/`
both come from `rule_groups()`. Each rule has a summary, a description and a runbook link
to its entry in docs/runbook.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Thresholds", "rule_groups", "rules_yaml", "RULES_FILE", "RUNBOOK_URL"]

# where the rules file lives in the repository, relative to its root (the CLI passes the root)
RULES_FILE = Path("k8s") / "base" / "prometheus" / "ecoserve-rules.yaml"
RUNBOOK_URL = "https://github.com/ecoserve/ecoserve/blob/main/docs/runbook.md#runbook"


@dataclass(frozen=True)
class Thresholds:
    systemic_failure_excess: float = 0.05  # absolute excess over the independence baseline
    min_labeled_outcomes: int = 100  # do not judge a window with fewer complete labeled outcomes
    excess_for: str = "15m"
    unanimity_drop_ratio: float = 0.8  # last 15 min below 80% of the previous 6 h
    min_predictions: int = 50
    label_stall_minutes: int = 30
    coverage_age_s: int = 86400
    min_coverage: float = 0.5
    min_propensity: float = 0.01
    member_missing_ratio: float = 0.01
    handover_failing_s: int = 120  # hand-overs failing this long: records pile up in the gateways' queues
    served_entropy_ratio: float = 0.5  # served-output entropy below half its average over the day before
    min_served_per_hour: int = 100
    candidate_negative_flip: float = 0.05  # a subgroup whose negative flip rate's lower bound is above this
    candidate_min_labeled: int = 50  # do not judge a candidate on fewer labeled outcomes (per subgroup)
    candidate_for: str = "30m"


def _rule(alert: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": alert,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": f"{RUNBOOK_URL}-{alert.lower()}",
        },
    }


def rule_groups(t: Thresholds = Thresholds()) -> list[dict[str, Any]]:
    rules = [
        _rule(
            "EcoserveSystemicFailureExcess",
            # the lower end of the excess (Wilson): a small or noisy window does not page
            f'ecoserve_window_systemic_failure_excess_ratio_lower{{subgroup="all"}} > {t.systemic_failure_excess} '
            f'and on (ecosystem) ecoserve_window_labeled_outcomes{{subgroup="all"}} >= {t.min_labeled_outcomes}',
            t.excess_for, "warning",
            "Members of {{ $labels.ecosystem }} fail together far more than independent models would",
            "Systemic failure rate exceeds its independence baseline by at least {{ $value | humanizePercentage }} "
            f"(95% lower bound; threshold {t.systemic_failure_excess:.0%}) over the rolling window.",
        ),
        _rule(
            "EcoserveSubgroupSystemicFailureExcess",
            f'ecoserve_window_systemic_failure_excess_ratio_lower{{subgroup!="all"}} > {t.systemic_failure_excess} '
            f'and on (ecosystem, subgroup, subgroup_value) ecoserve_window_labeled_outcomes{{subgroup!="all"}} '
            f'>= {t.min_labeled_outcomes}',
            t.excess_for, "warning",
            "{{ $labels.subgroup }}={{ $labels.subgroup_value }} in {{ $labels.ecosystem }}: systemic failure excess",
            "In this subgroup all members fail together at least {{ $value | humanizePercentage }} more often than "
            "independent members would (95% lower bound).",
        ),
        _rule(
            "EcoserveUnanimityDrop",
            "(sum by (ecosystem) (increase(ecoserve_unanimous_total{subgroup=\"all\"}[15m])) "
            "/ sum by (ecosystem) (increase(ecoserve_predicted_total{subgroup=\"all\"}[15m]))) "
            f"< {t.unanimity_drop_ratio} * (sum by (ecosystem) (increase(ecoserve_unanimous_total{{subgroup=\"all\"}}[6h] offset 15m)) "
            "/ sum by (ecosystem) (increase(ecoserve_predicted_total{subgroup=\"all\"}[6h] offset 15m))) "
            f"and on (ecosystem) sum by (ecosystem) (increase(ecoserve_predicted_total{{subgroup=\"all\"}}[15m])) >= {t.min_predictions}",
            "10m", "warning",
            "Members of {{ $labels.ecosystem }} suddenly disagree (label-free early warning)",
            "Unanimity over the last 15 minutes fell below "
            f"{t.unanimity_drop_ratio:.0%} of the previous 6 hours: input drift or a broken member, before any label arrives.",
        ),
        _rule(
            "EcoserveLabelsStalled",
            f'sum by (ecosystem) (increase(ecoserve_labeled_outcomes_total{{subgroup="all"}}[{t.label_stall_minutes}m])) == 0 '
            f"and on (ecosystem) sum by (ecosystem) (increase(ecoserve_outcomes_total[{t.label_stall_minutes}m])) > 0",
            "10m", "warning",
            "No labels for {{ $labels.ecosystem }} while it serves traffic",
            f"No label (observed or assumed) joined in {t.label_stall_minutes} minutes although outcomes are recorded: "
            "the feedback pipeline is stalled.",
        ),
        _rule(
            "EcoserveLabelCoverageLow",
            f'ecoserve_label_coverage_ratio{{age_seconds="{t.coverage_age_s}"}} < {t.min_coverage}',
            "1h", "warning",
            "Few old outcomes of {{ $labels.ecosystem }} have labels",
            f"Only {{{{ $value | humanizePercentage }}}} of outcomes older than {t.coverage_age_s} s have a label "
            f"(threshold {t.min_coverage:.0%}).",
        ),
        _rule(
            "EcoserveExplorationPositivity",
            f"ecoserve_window_min_propensity < {t.min_propensity}",
            "5m", "warning",
            "Exploration positivity violated in {{ $labels.ecosystem }}",
            f"The smallest logged propensity is {{{{ $value }}}} (floor {t.min_propensity}): off-policy estimates "
            "rest on huge importance weights.",
        ),
        _rule(
            "EcoserveServedOutputsNarrowing",
            f"ecoserve_window_served_output_entropy < {t.served_entropy_ratio} * "
            "avg_over_time(ecoserve_window_served_output_entropy[1d] offset 1h) "
            f"and on (ecosystem) sum by (ecosystem) (increase(ecoserve_served_total[1h])) >= {t.min_served_per_hour}",
            "30m", "warning",
            "What {{ $labels.ecosystem }} serves is narrowing (a degenerate feedback loop?)",
            "The entropy of the outputs served is {{ $value | humanize }} bits, under "
            f"{t.served_entropy_ratio:.0%} of its average over the day before the last hour: fewer distinct outputs "
            "reach callers, so the labels that come back teach less about the others.",
        ),
        _rule(
            "EcoserveMemberMissingOutputs",
            "sum by (ecosystem, member) (rate(ecoserve_member_missing_outputs_total[5m])) "
            "/ on (ecosystem) group_left sum by (ecosystem) (rate(ecoserve_outcomes_total[5m])) "
            f"> {t.member_missing_ratio}",
            "5m", "critical",
            "Member {{ $labels.member }} of {{ $labels.ecosystem }} is erroring or timing out",
            "{{ $value | humanizePercentage }} of outcomes lack this member's output (errors or timeouts).",
        ),
        _rule(
            "EcoserveOutcomesDropped",
            "sum(increase(ecoserve_outcomes_dropped_total[5m])) > 0",
            "0m", "critical",
            "Outcome records are being dropped",
            "{{ $value }} outcome records were dropped in 5 minutes (a gateway queue was full, or the store "
            "refused a record: see the reason label): ecosystem metrics are missing data.",
        ),
        _rule(
            "EcoserveHandoversFailing",
            # from the gauge's own timestamp, not `for:`: a Prometheus restart does not reset it
            f"(time() - (ecoserve_handover_failing_since_timestamp_seconds > 0)) > {t.handover_failing_s}",
            "0m", "critical",
            "The recorder cannot store outcome records",
            "Hand-overs to the outcome store have failed for {{ $value | humanizeDuration }} (the store is "
            "unreachable or full): records wait in the gateways' bounded queues and are dropped once those fill.",
        ),
        _rule(
            "EcoserveStoreDown",
            # also without traffic (no hand-over to fail): the recorder checks its store every sweep
            f"(time() - (ecoserve_store_down_since_timestamp_seconds > 0)) > {t.handover_failing_s}",
            "0m", "critical",
            "The outcome store is down",
            "The recorder's outcome store has failed its checks or writes for {{ $value | humanizeDuration }}: "
            "outcomes wait in the gateways' queues, labels get 503, label coverage is not refreshed.",
        ),
        _rule(
            "EcoserveOutcomesLost",
            "sum by (ecosystem) (increase(ecoserve_outcomes_lost_total[15m])) > 0",
            "0m", "warning",
            "A gateway of {{ $labels.ecosystem }} crashed with outcome records queued",
            "{{ $value }} outcome records of {{ $labels.ecosystem }} were lost in the last 15 minutes: a gateway "
            "replica died before handing them to the recorder.",
        ),
        _rule(
            "EcoserveCandidateRegressionsConcentrated",
            # regressions concentrate in one subgroup: its negative flip rate's lower bound (Wilson)
            f'ecoserve_candidate_negative_flip_ratio_lower{{subgroup!="all"}} > {t.candidate_negative_flip} '
            f'and on (ecosystem, member, version, candidate, subgroup, subgroup_value) '
            f'ecoserve_candidate_labeled_total{{subgroup!="all"}} >= {t.candidate_min_labeled}',
            t.candidate_for, "warning",
            "Candidate {{ $labels.member }} v{{ $labels.candidate }} of {{ $labels.ecosystem }} breaks what "
            "v{{ $labels.version }} got right for {{ $labels.subgroup }}={{ $labels.subgroup_value }}",
            "In this subgroup the candidate gets wrong at least {{ $value | humanizePercentage }} of the outcomes the "
            "serving version gets right (95% lower bound of the negative flip rate): do not promote it as is.",
        ),
        _rule(
            "EcoserveCandidateWorseForSubgroup",
            # better on average (lower bound of the accuracy delta above 0), worse for a subgroup (upper below 0)
            'ecoserve_candidate_accuracy_delta_upper{subgroup!="all"} < 0 '
            'and on (ecosystem, member, version, candidate) ecoserve_candidate_accuracy_delta_lower{subgroup="all"} > 0',
            t.candidate_for, "warning",
            "Candidate {{ $labels.member }} v{{ $labels.candidate }} of {{ $labels.ecosystem }} is better on average "
            "but worse for {{ $labels.subgroup }}={{ $labels.subgroup_value }}",
            "Its accuracy is above the serving version's overall, and below it in this subgroup (95% upper bound of "
            "the difference: {{ $value | humanizePercentage }}): promoting it would move errors onto this group.",
        ),
        _rule(
            "EcoservePipelineSelfDefeatingImprovement",
            # the changed stage better on its own (delta lower > 0), the chain worse (delta upper < 0)
            "ecoserve_pipeline_self_defeating_improvement == 1",
            t.candidate_for, "warning",
            "Candidate {{ $labels.member }} v{{ $labels.candidate }} of {{ $labels.ecosystem }}: a better "
            "{{ $labels.stage }} stage makes the pipeline worse",
            "The {{ $labels.stage }} stage of the candidate is more accurate on its own than the serving "
            "version's, and the whole pipeline is less accurate end to end (both 95% intervals exclude 0): the "
            "stages after it were not trained on its outputs. Do not promote it as is.",
        ),
    ]
    return [{"name": "ecoserve", "rules": rules}]


def rules_yaml(t: Thresholds = Thresholds()) -> str:
    return "# Generated by `ecoserve alerts generate` from ecoserve/ops/alerts.py; do not edit.\n" + yaml.safe_dump(
        {"groups": rule_groups(t)}, sort_keys=False, width=200
    )


def write_rules(path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(rules_yaml())
    return p
