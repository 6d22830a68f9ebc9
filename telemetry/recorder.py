"""The recorder: durable outcomes, the label join, and the streamed ecosystem counts.

One `Recorder` owns the store and every count. It is plain Python (the Ray
deployment in `serving.recording.deployment` only wraps it), so all of its
behaviour is tested without Ray:

- `record(outcomes)`: store them (an id already stored is skipped, so a retried
  batch is never counted twice), count their predictions (label-free metrics),
  and join labels that arrived before them;
- `feedback(items)`: validate the whole batch first (nothing is applied if any
  item is bad), then per item: `joined` (first label), `duplicate` (same label
  again: nothing changes), `correction` (a different label: kept in the label
  history, counted, the streamed counts keep the first label), or `pending` (no
  such outcome yet: held until it arrives or its TTL passes);
- `sweep()`: finalize outcomes left unlabeled past `assume_label_after_s` as
  `assumed`, and expire pending labels past their TTL;
- restart safety: a new recorder rebuilds every cumulative count from the store
  (each outcome's predictions, and its *counted* label), so counts after a
  restart are neither lower nor double.

Streamed counts keep each outcome's first label; label sources (`observed`,
`assumed`) are counted apart.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from telemetry.counts import EcosystemCounts, correctness, value_correctness
from telemetry.estimation import Estimate, EstimateSums, SystemicEstimator
from telemetry.events import Event, EventCounts
from telemetry.exploration import ExplorationCounts
from telemetry.flips import CandidateFlips, FlipKey
from telemetry.ranking import RankingCounts, ranking_correctness
from telemetry.records import Outcome, outcome_fields
from telemetry.serving_stats import merge_reports
from telemetry.spec import EcosystemSpec
from telemetry.store import FirstLabel, InvalidRecord, OutcomeStore, StoredOutcome
from telemetry.text import id_problem, text_problem
from telemetry.window import RollingWindow

__all__ = [
    "LabelItem",
    "ItemResult",
    "FeedbackError",
    "Recorder",
    "RecorderSnapshot",
    "EcosystemSnapshot",
    "SOURCES",
    "DELAY_BUCKETS_S",
    "COVERAGE_AGES_S",
]

log = logging.getLogger(__name__)

SOURCES = ("observed", "assumed")
DELAY_BUCKETS_S = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 6 * 3600.0, 86400.0, 3 * 86400.0, 7 * 86400.0, 30 * 86400.0)
COVERAGE_AGES_S = (60.0, 600.0, 3600.0, 86400.0, 7 * 86400.0)


class FeedbackError(ValueError):
    """A feedback item is invalid; names the item index and the field. Nothing was applied."""

    def __init__(self, index: int | None, fieldname: str, message: str, status: int = 422) -> None:
        super().__init__(f"item {index}: {fieldname}: {message}" if index is not None else f"{fieldname}: {message}")
        self.index, self.field, self.status = index, fieldname, status


def _missing(p: Any) -> bool:
    """A stored or given output that is missing: class id -1, or a value that is None or NaN."""
    return p is None or (isinstance(p, float) and math.isnan(p)) or (isinstance(p, int) and p < 0)


class LabelItem(NamedTuple):
    """One label as the feedback API received it (a named tuple: thousands per request)."""

    request_id: str
    label: int | float | str
    timestamp: float | None = None  # when the label was observed (unix s); default: arrival
    source: str = ""  # free text: where the label came from (kept in the label history)


class ItemResult(NamedTuple):
    """What became of one label (a named tuple: one per label, and a frozen dataclass's `__init__`
    costs several times a tuple's)."""

    request_id: str
    status: Literal["joined", "duplicate", "correction", "pending"]

    @property
    def unknown_request_id(self) -> bool:
        return self.status == "pending"


@dataclass(frozen=True)
class EcosystemSnapshot:
    """One ecosystem's counts at one moment: copies, so readers never see the recorder's state
    change under them (`Recorder.snapshot`)."""

    spec: EcosystemSpec
    outcomes: int
    incomplete: int
    direct: int
    explored: int
    missing: np.ndarray  # per member: outcomes without its output
    served: np.ndarray  # per member: outcomes it served
    served_propensity: np.ndarray  # per member: sum of logged propensities of policy-routed rows it served
    fallbacks: np.ndarray  # per member: rows it was chosen for but failed
    served_outputs: np.ndarray  # per class (regression: per bin): outcomes whose caller received it
    predictions: EcosystemCounts  # label-free part, every outcome
    labels: dict[str, EcosystemCounts]  # per label source: the label part
    delay: dict[str, tuple[np.ndarray, float]]  # per label source: delay histogram buckets and sum (s)
    window: tuple[EcosystemCounts, ExplorationCounts]  # the rolling window's totals
    flips: CandidateFlips | None = None  # candidate versions in shadow (a copy)
    ranking: RankingCounts | None = None  # a ranking ecosystem's counts since the store began (a copy)
    ranking_window: RankingCounts | None = None  # the same, over the rolling window


@dataclass(frozen=True)
class RecorderSnapshot:
    """Everything `/metrics` reports, read at one moment (`Recorder.snapshot`)."""

    ecosystems: dict[str, EcosystemSnapshot]
    events: EventCounts
    pending: int
    dropped: dict[str, int]
    handover_failures: int
    handover_failing_since: float | None
    store_down_since: float | None  # the store failed its latest check or write (None: up)
    window_s: float
    cpu_s: dict[str, float]
    serving: dict[str, Any]  # the gateways' serving reports, merged
    coverage: dict[str, dict[float, tuple[int, int]]]  # ecosystem -> age -> (outcomes, labeled)
    coverage_ages_s: tuple[float, ...]
    estimates: dict[str, EcosystemEstimates] = field(default_factory=dict)  # label-free, per ecosystem


class _EcosystemState:
    def __init__(self, spec: EcosystemSpec, window_s: float, n_buckets: int, clock: Callable[[], float]) -> None:
        self.spec = spec
        self.shape = shape = spec.shape
        m = len(spec.members)
        self.predictions = EcosystemCounts(shape)
        self.labels = {s: EcosystemCounts(shape) for s in SOURCES}
        self.exploration = ExplorationCounts(spec.members, len(spec.classes))
        self.window = RollingWindow(shape, window_s, n_buckets, clock)
        self.outcomes = 0
        self.incomplete = 0
        self.direct = 0
        self.explored = 0
        self.missing = np.zeros(m, dtype=np.int64)
        self.served = np.zeros(m, dtype=np.int64)
        self.served_propensity = np.zeros(m)
        self.fallbacks = np.zeros(m, dtype=np.int64)
        # what callers received, per class (a regression ecosystem: per bin), every outcome counted
        # when recorded: the served-output distribution (docs/design.md: degenerate feedback loops)
        self.served_outputs = np.zeros(len(spec.classes), dtype=np.int64)
        self.delay = {s: (np.zeros(len(DELAY_BUCKETS_S) + 1, dtype=np.int64), [0.0]) for s in SOURCES}
        self.flips = CandidateFlips(shape)  # candidate versions in shadow (telemetry.flips)
        # ranking ecosystems: exposure, overlap, clicks (telemetry.ranking)
        self.ranking = RankingCounts(spec.members, spec.no_click, spec.k) if spec.ranking else None
        self.ranking_window: dict[int, RankingCounts] = {}  # bucket index -> counts (the window's buckets)

    def ranking_bucket(self, now: float) -> RankingCounts:
        """The ranking counts' bucket of the rolling window at `now` (older buckets expire)."""
        assert self.ranking is not None
        idx = int(now // self.window.bucket_s)
        for old in [b for b in self.ranking_window if b <= idx - self.window.n_buckets]:
            del self.ranking_window[old]
        bucket = self.ranking_window.get(idx)
        if bucket is None:
            bucket = self.ranking_window[idx] = RankingCounts(self.ranking.members, self.ranking.n_items,
                                                              self.ranking.k)
        return bucket

    def ranking_window_total(self, now: float) -> RankingCounts | None:
        if self.ranking is None:
            return None
        self.ranking_bucket(now)  # expires what is out of the window
        total = RankingCounts(self.ranking.members, self.ranking.n_items, self.ranking.k)
        for bucket in self.ranking_window.values():
            total = total + bucket
        return total

    def groups_of(self, groups: Sequence[dict[str, str]]) -> dict[str, list[str]] | None:
        if not self.spec.subgroups:
            return None
        return {attr: [g.get(attr, "") for g in groups] for attr in self.spec.subgroups}


def _correct(spec: EcosystemSpec, raw: np.ndarray, preds: np.ndarray, served: np.ndarray, labels: np.ndarray,
             outcomes: Sequence[StoredOutcome] | None = None) -> np.ndarray:
    """Correctness (N, M) in {1, 0, -1} of stored outcomes given their labels (class ids, values
    or rewards); `raw` are the predictions as stored, `preds` their codes (`EcosystemSpec.codes`);
    a ranking ecosystem judges the outcomes' recorded lists (`telemetry.ranking`)."""
    if spec.ranking:
        assert outcomes is not None, "a ranking ecosystem's correctness needs the outcomes' lists"
        return ranking_correctness(spec, [o.members for o in outcomes], [o.rankings for o in outcomes], labels)
    if spec.label_mode == "bandit":  # a member's reward is known where its output (bin) is the served one
        kept = served >= 0  # (a served member no longer in the ecosystem: nothing is known)
        return correctness(preds, served=np.maximum(served, 0), rewards=np.where(kept, labels, np.nan))
    if spec.regression:
        return value_correctness(raw, labels, spec.tolerance)
    return correctness(preds, labels.astype(np.int64))


def _correct_in_place(spec: EcosystemSpec, raw: np.ndarray, served: np.ndarray, labels: np.ndarray,
                      rows: np.ndarray, members: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Correctness of `outputs` (a candidate's, a stage's), each judged by the ecosystem's own rule
    (`_correct`) in its member's place on its outcome (`rows`, `members`: indices into `raw`)."""
    swapped = raw[rows].copy()
    k = np.arange(len(rows))
    swapped[k, members] = outputs
    judged: np.ndarray = _correct(spec, swapped, spec.codes(swapped), served[rows], labels[rows])[k, members]
    return judged


def _candidate_rows(
    spec: EcosystemSpec, members_of: Sequence[tuple[str, ...]], candidates_of: Sequence[Any],
) -> tuple[np.ndarray, np.ndarray, list[FlipKey], np.ndarray] | None:
    """Every (outcome, candidate that ran on it) of a batch: the outcome's row, the shadowed
    member's index in `spec.members`, the flip key and the candidate's raw output (-1 / NaN:
    missing). Candidates of members no longer in the ecosystem are left out."""
    rows, idx, keys, outs = [], [], [], []
    for i, cands in enumerate(candidates_of):
        for a, current, version, out, *_ in cands or ():
            name = members_of[i][a] if 0 <= a < len(members_of[i]) else None
            if name not in spec.members:
                continue
            rows.append(i)
            idx.append(spec.members.index(name))
            keys.append((name, str(current), str(version)))
            outs.append(out)
    if not rows:
        return None
    if spec.regression:
        cand_raw = np.array([np.nan if v is None else float(v) for v in outs], dtype=np.float64)
    else:
        cand_raw = np.array([-1 if v is None else int(v) for v in outs], dtype=np.int64)
    return np.array(rows), np.array(idx), keys, cand_raw


def _stage_rows(
    spec: EcosystemSpec, members_of: Sequence[tuple[str, ...]], candidates_of: Sequence[Any], stages_of: Sequence[Any],
) -> tuple[np.ndarray, np.ndarray, list[FlipKey], list[tuple[FlipKey, FlipKey]], np.ndarray, np.ndarray] | None:
    """Every (outcome, stage of a pipeline member whose candidate runs another version of it, with a
    class of its own in both): the outcome's row, the member's index in `spec.members`, the stage's
    flip key ("member.stage", serving stage version, candidate stage version), the (member's flip
    key, stage key) link, and the candidate's and the serving version's stage classes (-1: none)."""
    rows, idx, keys, links, cand, cur = [], [], [], [], [], []
    for i, stages in enumerate(stages_of):
        if not stages or not candidates_of[i]:
            continue
        by_role: dict[tuple[int, int, str], tuple[str, Any]] = {(e[0], e[1], e[2]): (e[3], e[5]) for e in stages}
        for a, current, version, *_ in candidates_of[i]:
            name = members_of[i][a] if 0 <= a < len(members_of[i]) else None
            if name not in spec.members:
                continue
            for (a2, role, stage), (sv, own) in by_role.items():
                if a2 != a or role != 0 or own is None or (a, 1, stage) not in by_role:
                    continue
                cv, cand_own = by_role[(a, 1, stage)]
                if cv == sv or cand_own is None:
                    continue
                key = (f"{name}.{stage}", str(sv), str(cv))
                rows.append(i)
                idx.append(spec.members.index(name))
                keys.append(key)
                links.append(((name, str(current), str(version)), key))
                cand.append(int(cand_own))
                cur.append(int(own))
    if not rows:
        return None
    return (np.array(rows), np.array(idx), keys, links, np.array(cand, dtype=np.int64),
            np.array(cur, dtype=np.int64))


AUDIT_KINDS = ("systemic", "cie")
AUDIT_MAX_SCAN = 200_000  # stored outcomes one audit request reads at most
AUDIT_MAX_LIMIT = 10_000

ESTIMATE_PAGE = 5000  # outcomes read from the store at a time for the label-free estimates


@dataclass
class EcosystemEstimates:
    """The latest label-free estimates of one ecosystem (`Recorder.refresh_estimates`)."""

    version: int
    fitted_at: float
    n_fit: int
    base_rate: float  # the reference's realized systemic failure rate
    n: int  # outcomes estimated (waiting for labels, in the window)
    systemic: dict[tuple[str, str], Estimate] = field(default_factory=dict)  # (subgroup, value) -> estimate
    accuracy: list[Estimate] = field(default_factory=list)  # per member
    error: float | None = None  # |estimated - realized| on outcomes labeled since the fit
    checked: int = 0


class Recorder:
    def __init__(
        self,
        specs: dict[str, EcosystemSpec],
        store: OutcomeStore,
        *,
        pending_ttl_s: float = 3600.0,
        max_pending: int = 100_000,
        window_s: float = 3600.0,
        window_buckets: int = 12,
        coverage_ages_s: Sequence[float] = COVERAGE_AGES_S,
        clock: Callable[[], float] = time.time,
        estimate_refit_s: float = 600.0,
        estimate_reference: int = 20_000,
        estimate_max: int = 20_000,
    ) -> None:
        # label-free estimates (telemetry.estimation): refit period, reference size, outcomes estimated
        self.estimate_refit_s, self.estimate_reference, self.estimate_max = (
            estimate_refit_s, estimate_reference, estimate_max)
        self.coverage_ages_s = tuple(coverage_ages_s)
        self.specs = specs
        self.store = store
        self.pending_ttl_s = pending_ttl_s
        self.max_pending = max_pending
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.RLock()
        self.state = {name: _EcosystemState(spec, window_s, window_buckets, clock) for name, spec in specs.items()}
        # event counters, kept in the store so that a restart does not reset them (telemetry.events)
        self.events = EventCounts.from_store(store.event_counts(), set(specs))
        # hand-overs that failed for a reason a retry may cure (store down, disk full): since when
        # (None: the last one succeeded), and how many in all; `ecoserve_handover_*`
        self.handover_failing_since: float | None = None
        self.handover_failures = 0
        # the store's latest health check (`check_store`) failed: since when (None: it answered)
        self.check_failing_since: float | None = None
        self._logged_invalid: set[str] = set()
        self.reports: dict[str, dict[str, Any]] = {}
        # CPU seconds of the threads that did the recorder's work, per operation (since start):
        # the telemetry's own cost, `ecoserve_recorder_cpu_seconds_total`
        self.cpu_s: dict[str, float] = {"record": 0.0, "feedback": 0.0, "sweep": 0.0}
        self._pending = store.count_pending()
        self._coverage_cache: tuple[float, dict[str, dict[float, tuple[int, int]]]] = (0.0, {})
        self.estimators: dict[str, SystemicEstimator] = {}
        self.estimates: dict[str, EcosystemEstimates] = {}
        for eco, model in store.latest_estimators().items():
            est = SystemicEstimator.from_json(model)
            if eco in specs and est.members == specs[eco].members:  # a changed member list: refit
                self.estimators[eco] = est
        self._rebuild()

    # ------------------------------------------------------ event counts
    def _count(self, totals: dict[Event, int] | None = None, **per_ecosystem: Counter[Any]) -> None:
        """Add to the event counters, here and in the store (`telemetry.events`)."""
        delta = EventCounts(Counter(totals or {}), **per_ecosystem)
        self.events.add(delta)
        increments = delta.store_increments()
        if increments:
            self.store.bump(increments)

    @contextmanager
    def _cpu(self, operation: str) -> Iterator[None]:
        t0 = time.thread_time()
        try:
            yield
        finally:
            self.cpu_s[operation] += time.thread_time() - t0

    # ---------------------------------------------------------- rebuild
    def _rebuild(self) -> None:
        """Rebuild every cumulative count from the store (restart safety)."""
        for name, st in self.state.items():
            for batch in self.store.iter_outcomes(name):
                self._count_predictions(st, batch)
                for source in SOURCES:
                    labeled = [o for o in batch if o.counted_label is not None and o.counted_source == source]
                    if labeled:
                        self._count_labels(
                            st, labeled, np.array([o.counted_label for o in labeled]), source,
                            np.array([o.counted_time or o.created_at for o in labeled]),
                        )

    # ----------------------------------------------------------- record
    def record(self, items: Sequence[Outcome], reporter: str = "", report: dict[str, Any] | None = None) -> dict[str, int]:
        """Store and count a batch of outcomes; join labels that were waiting for them (see
        `record_fields`)."""
        return self.record_fields(list(map(outcome_fields, items)), reporter, report)

    def record_fields(
        self, items: list[tuple[Any, ...]], reporter: str = "", report: dict[str, Any] | None = None
    ) -> dict[str, int]:
        """`record` of outcomes as their field tuples (`outcome_fields`): what crosses from the
        gateway to a recorder process, and what the counting transposes into columns.

        `report` is the gateway's cumulative `{"dropped": {reason: n}, "serving": ServingStats
        snapshot, "progress": {ecosystem: records handed over so far}}`; the latest per reporter
        is kept and the metrics show the sum. `progress` is stored with the outcomes, in the
        same transaction, for the reporter's crash ledger (`reclaim`)."""
        with self._lock, self._cpu("record"):
            progress = None
            if report is not None and reporter:
                self.reports[reporter] = report
                if items and report.get("progress"):
                    progress = (reporter, {str(k): int(v) for k, v in report["progress"].items()})
            known = items
            ecosystems = {f[1] for f in known}
            if not ecosystems <= self.state.keys():
                known = [f for f in known if f[1] in self.state]
                ecosystems &= self.state.keys()
            unlost: dict[str, int] = {}
            try:
                inserted, invalid = self._insert(known, progress, unlost)
            except Exception:
                self.handover_failures += 1
                if self.handover_failing_since is None:
                    self.handover_failing_since = self.clock()
                raise
            if known:  # a write succeeded (an empty hand-over, a gateway's poll, writes nothing)
                self.handover_failing_since = None
            for eco, n in unlost.items():  # a hand-over that landed after its gateway was counted lost
                if eco in self.state:
                    self.events.lost[eco] -= n
            if invalid:
                ids = {f[0] for f in invalid}
                known = [f for f in known if f[0] not in ids]
            self._count({Event.UNKNOWN_ECOSYSTEM: len(items) - len(known) - len(invalid),
                         Event.DUPLICATE_OUTCOME_IDS: len(known) - len(inserted), Event.INVALID_OUTCOMES: len(invalid)})
            if len(inserted) == len(known):
                fresh = known
            else:  # skip ids stored before, and repeats within the batch (the store kept the first)
                fresh, left = [], set(inserted)
                for f in known:
                    if f[0] in left:
                        left.discard(f[0])
                        fresh.append(f)
            for name in ecosystems:
                mine = [f for f in fresh if f[1] == name]
                if mine:
                    self._count_predictions(self.state[name], mine)
            joined = 0
            if known and self._pending:
                # labels held for these outcomes: of new ones, and of ones stored by an earlier try of
                # this hand-over whose join failed (the store went away between the two); a held label
                # leaves the store in the same transaction that applies it, so a failure keeps it held
                waiting = self.store.pending_for([f[0] for f in known])
                if waiting:
                    # a held label its outcome's ecosystem cannot take (e.g. a class of another
                    # ecosystem) is dropped and counted, one by one: it must not take the other
                    # waiting labels of this hand-over down with it
                    eco_of = {f[0]: f[1] for f in known}
                    items_, rejected, out_of_scope = [], 0, 0
                    for w in waiting:
                        eco = eco_of[w["request_id"]]
                        if w.get("scope") is not None and eco not in w["scope"]:
                            out_of_scope += 1  # its token did not cover this ecosystem: never joined
                            continue
                        try:
                            self.specs[eco].label_value(w["label"])
                        except ValueError:
                            rejected += 1
                            continue
                        items_.append(LabelItem(w["request_id"], w["label"], w["label_time"], w["source"]))
                    consumed = [w["request_id"] for w in waiting]
                    if items_:
                        received = {w["request_id"]: w["received_at"] for w in waiting}
                        results = self._feedback_locked(items_, received_at=received, allow_pending=False,
                                                        consumed=consumed)
                        joined = sum(1 for r in results if r.status == "joined")
                    else:
                        self.store.apply_labels([], [], None, consumed)
                    self._pending = max(0, self._pending - len(waiting))
                    if rejected or out_of_scope:
                        self._count({Event.PENDING_REJECTED: rejected, Event.PENDING_OUT_OF_SCOPE: out_of_scope})
            return {"received": len(items), "inserted": len(inserted), "joined_pending": joined}

    def record_outside(self, items: list[tuple[Any, ...]]) -> dict[str, int]:
        """Outcomes recorded from outside (`POST /v2/outcomes`), as field tuples. For an id stored
        already: the same outputs change nothing (a replay); outputs of members the stored outcome
        lacks (or has missing) complete it, if it has no label yet (an outcome served here, whose
        external members answer later); any other difference is refused (`FeedbackError`, nothing
        applied). The rest are recorded like any hand-over."""
        with self._lock:
            stored = self.store.get_outcomes([f[0] for f in items])
            unchanged, completions = 0, []
            for idx, f in enumerate(items):
                old = stored.get(f[0])
                if old is None:
                    continue
                if old.ecosystem != f[1]:
                    raise FeedbackError(idx, "ecosystem", f"{f[0]!r} is stored already as an outcome of {old.ecosystem!r}")
                have = {m: p for m, p in zip(old.members, old.predictions) if not _missing(p)}
                given = {m: p for m, p in zip(f[3], f[5]) if not _missing(p)}
                if any(have[m] != p for m, p in given.items() if m in have):
                    raise FeedbackError(idx, "request_id", f"{f[0]!r} is stored already with other outputs")
                added = {m: p for m, p in given.items() if m not in have}
                if not added:
                    unchanged += 1
                    continue
                if old.label is not None:
                    raise FeedbackError(idx, "request_id", f"{f[0]!r} is labeled already: outputs from outside must "
                                        "arrive before the label")
                if f[6] >= 0 and f[3][f[6]] not in have:
                    raise FeedbackError(idx, "served", f"{f[0]!r} was served here: a completion names no served member")
                versions = dict(zip(f[3], f[4]))
                completions.append((old, {m: (versions[m], p) for m, p in added.items()}))
            if completions:
                self.store.complete_outcomes([(old.request_id, outs) for old, outs in completions])
                for old, outs in completions:
                    self._recount(old, {m: p for m, (_, p) in outs.items()})
        fresh = [f for f in items if f[0] not in stored]
        result = self.record_fields(fresh) if fresh else {"received": 0, "inserted": 0, "joined_pending": 0}
        return {"received": len(items), "recorded": result["inserted"], "completed": len(completions),
                "unchanged": unchanged, "joined_pending": result["joined_pending"]}

    def _recount(self, old: StoredOutcome, added: dict[str, Any]) -> None:
        """Re-count one unlabeled outcome whose members' outputs were completed: its label-free
        counts, missing outputs and completeness, in the cumulative counts and the window."""
        st = self.state[old.ecosystem]
        members = list(old.members) + [m for m in added if m not in old.members]
        preds = [added.get(m, p) for m, p in zip(old.members, old.predictions)] + \
            [added[m] for m in members[len(old.members):]]
        before = st.spec.codes(st.spec.align([old.members], [old.predictions], [old.served], [old.intended],
                                             [old.greedy], [old.propensities])[0])
        props = list(old.propensities) + [0.0] * (len(members) - len(old.members))
        after = st.spec.codes(st.spec.align([tuple(members)], [preds], [old.served], [old.intended], [old.greedy],
                                            [props])[0])
        groups = st.groups_of([old.groups])
        delta = EcosystemCounts.from_arrays(st.shape, after, None, groups) + \
            (-EcosystemCounts.from_arrays(st.shape, before, None, groups))
        st.predictions = st.predictions + delta
        st.missing += (before < 0).sum(axis=0) * -1 + (after < 0).sum(axis=0)
        st.incomplete += int((after < 0).any()) - int((before < 0).any())
        if old.created_at >= self.clock() - self.window_s:
            st.window.add(delta)

    def _insert(
        self, items: list[tuple[Any, ...]], progress: tuple[str, dict[str, int]] | None, unlost: dict[str, int],
    ) -> tuple[set[str], list[tuple[Any, ...]]]:
        """Store a hand-over: (ids inserted, records the store refused). One record the store cannot
        hold (a data error: re-sending cannot help) must not stop the others, nor every later
        hand-over: the batch is split in halves until each refused record stands alone, every good
        one is stored, and the refused ones are returned to be dropped and counted. Any other
        error (the store unreachable, a full disk) is raised: the gateway keeps the records queued
        and sends them again."""
        try:
            return self.store.insert_fields(items, progress, unlost), []
        except InvalidRecord as exc:
            if len(items) <= 1:
                self._log_invalid(exc)
                invalid, inserted = list(items), set[str]()
            else:
                inserted, invalid = set[str](), []
                half = len(items) // 2
                self._bisect(items[:half], inserted, invalid)
                self._bisect(items[half:], inserted, invalid)
        unlost.clear()  # the failed transaction was rolled back
        if progress:  # what was handed over, the refused records included (they are not lost)
            self.store.insert_fields([], progress, unlost)
        return inserted, invalid

    def _bisect(self, items: list[tuple[Any, ...]], inserted: set[str], invalid: list[tuple[Any, ...]]) -> None:
        try:
            inserted |= self.store.insert_fields(items)
        except InvalidRecord as exc:
            if len(items) == 1:
                self._log_invalid(exc)
                invalid.append(items[0])
                return
            half = len(items) // 2
            self._bisect(items[:half], inserted, invalid)
            self._bisect(items[half:], inserted, invalid)

    def _log_invalid(self, exc: InvalidRecord) -> None:
        """Log each kind of refusal once (a flood of bad records must not flood the log)."""
        kind = re.sub(r"\d+", "N", str(exc))  # "in position 6" and "in position 7" are one kind
        if kind not in self._logged_invalid and len(self._logged_invalid) < 100:
            self._logged_invalid.add(kind)
            log.error("dropped an outcome record the store refused (counted in "
                      "ecoserve_outcomes_dropped_total{reason=\"invalid\"}; logged once per kind): %s", kind)

    def _count_predictions(self, st: _EcosystemState, items: Sequence[tuple[Any, ...]] | Sequence[StoredOutcome]) -> None:
        """Count a batch of outcomes' predictions (label-free part), vectorised. `items`: new
        outcomes as field tuples (`outcome_fields`), or stored outcomes (the rebuild)."""
        n, m = len(items), len(st.spec.members)
        if n and not isinstance(items[0], StoredOutcome):
            cols = list(zip(*items))  # Outcome's fields, in declaration order
            raw, served, intended, greedy, props_all = st.spec.align(cols[3], cols[5], cols[6], cols[7], cols[9], cols[8])
            times = np.array(cols[2], dtype=np.float64)
            direct = np.array(cols[11], dtype=bool)
            groups = st.groups_of(cols[12])
            members_of: Sequence[tuple[str, ...]] = cols[3]
            candidates_of: Sequence[Any] = cols[16]
            stages_of: Sequence[Any] = cols[17]
            rankings_of: Sequence[Any] = cols[18]
            shown_of: Sequence[Any] = cols[19]
            times_of: Sequence[float] = cols[2]
        else:
            stored: Sequence[StoredOutcome] = items  # type: ignore[assignment]
            raw, served, intended, greedy, props_all = st.spec.align(
                [o.members for o in stored], [o.predictions for o in stored], [o.served for o in stored],
                [o.intended for o in stored], [o.greedy for o in stored], [o.propensities for o in stored])
            times = np.array([o.created_at for o in stored], dtype=np.float64)
            direct = np.array([o.direct for o in stored], dtype=bool)
            groups = st.groups_of([o.groups for o in stored])
            members_of, candidates_of = [o.members for o in stored], [o.candidates for o in stored]
            stages_of = [o.stages for o in stored]
            rankings_of, shown_of = [o.rankings for o in stored], [o.shown for o in stored]
            times_of = [o.created_at for o in stored]
        preds = st.spec.codes(raw)
        if n and st.ranking is not None:
            st.ranking.count_recorded(members_of, rankings_of, shown_of)
            now = self.clock()
            fresh = [i for i, t in enumerate(times_of) if t >= now - self.window_s]
            if fresh:
                st.ranking_bucket(now).count_recorded([members_of[i] for i in fresh], [rankings_of[i] for i in fresh],
                                                      [shown_of[i] for i in fresh])
        if n and any(candidates_of):
            found = _candidate_rows(st.spec, members_of, candidates_of)
            if found is not None:
                rows_c, a_c, keys, cand_raw = found
                st.flips.count_recorded(keys, st.spec.codes(cand_raw[:, None])[:, 0], preds[rows_c, a_c])
            staged = _stage_rows(st.spec, members_of, candidates_of, stages_of) if any(stages_of) else None
            if staged is not None:  # a pipeline's stage candidates: the stages' own classes
                st.flips.links.update(staged[3])
                st.flips.count_recorded(staged[2], staged[4], staged[5])
        rows = np.arange(n)
        props = props_all[rows, np.maximum(intended, 0)]
        kept = served >= 0  # the served member is still a member (see EcosystemSpec.align)
        counts = EcosystemCounts.from_arrays(st.shape, preds, None, groups)
        st.predictions = st.predictions + counts
        # never missing where kept: a row is served only by a member that answered
        out = np.where(kept, preds[rows, np.maximum(served, 0)], -1)
        outputs = np.bincount(out[out >= 0], minlength=st.served_outputs.shape[0])
        st.served_outputs += outputs
        recent = times >= self.clock() - self.window_s
        if recent.all():
            st.window.add(counts, self._served_outputs(st, outputs))
        elif recent.any():
            sub = {k: [v[i] for i in np.flatnonzero(recent)] for k, v in groups.items()} if groups else None
            late = out[recent]
            st.window.add(EcosystemCounts.from_arrays(st.shape, preds[recent], None, sub), self._served_outputs(
                st, np.bincount(late[late >= 0], minlength=st.served_outputs.shape[0])))
        missing = preds < 0
        st.outcomes += n
        st.incomplete += int(missing.any(axis=1).sum())
        st.missing += missing.sum(axis=0)
        st.served += np.bincount(served[kept], minlength=m)
        st.direct += int(direct.sum())
        routed = ~direct & kept & (intended >= 0)
        st.served_propensity += np.bincount(served[routed], weights=props[routed], minlength=m)
        fell = routed & (served != intended)
        st.fallbacks += np.bincount(intended[fell], minlength=m)
        st.explored += int((routed & ~fell & (greedy >= 0) & (served != greedy)).sum())

    @staticmethod
    def _served_outputs(st: _EcosystemState, outputs: np.ndarray) -> ExplorationCounts:
        """The window's served-output counts, as exploration counts holding nothing else."""
        ex = ExplorationCounts(st.spec.members, len(st.spec.classes))
        ex.served_outputs = outputs.astype(np.int64)
        return ex

    # ---------------------------------------------------------- labels
    def feedback(self, items: Sequence[LabelItem], scope: frozenset[str] | None = None) -> list[ItemResult]:
        """Apply a batch of labels, all or nothing; see the module docstring for the statuses.
        `scope`: the ecosystems the caller's token covers (None: all). A label for an outcome of
        another ecosystem fails the batch (403); a held label keeps the scope and is dropped, and
        counted, if its outcome turns out to be of an ecosystem outside it."""
        with self._lock, self._cpu("feedback"):
            return self._feedback_locked(list(items), received_at=None, allow_pending=True, scope=scope)

    def _feedback_locked(
        self, items: list[LabelItem], *, received_at: dict[str, float] | None, allow_pending: bool,
        scope: frozenset[str] | None = None, consumed: Sequence[str] = (),
    ) -> list[ItemResult]:
        now = self.clock()
        found = self.store.get_outcomes(list({i.request_id for i in items}))
        # validate and classify in one pass, in arrival order (later items see earlier ones of the
        # same batch); nothing is applied until every item has passed (step 2)
        current: dict[str, tuple[float | None, str | None]] = {}
        first: list[FirstLabel] = []
        corrections: list[dict[str, Any]] = []
        pending: list[dict[str, Any]] = []
        results: list[ItemResult] = []
        fold: list[tuple[StoredOutcome, float, float]] = []
        corrected: list[tuple[str, str, str]] = []
        duplicates: list[str] = []
        specs = self.specs
        for idx, (rid, label, timestamp, origin) in enumerate(items):
            arrived = received_at.get(rid, now) if received_at else now
            label_time = timestamp if timestamp is not None else arrived
            o = found.get(rid)
            if o is None:
                self._check_pending_label(idx, label)
                pending.append({"request_id": rid, "label": label, "source": origin,
                                "label_time": label_time, "received_at": arrived, "scope": scope})
                results.append(ItemResult(rid, "pending"))
                continue
            if scope is not None and o.ecosystem not in scope:
                raise FeedbackError(idx, "request_id", f"this token does not cover ecosystem {o.ecosystem!r}", 403)
            try:
                value = specs[o.ecosystem].label_value(label)
            except ValueError as exc:
                raise FeedbackError(idx, "label", str(exc)) from exc
            cur_value, cur_source = current.get(rid) or (o.label, o.label_source)
            if cur_source is None:
                first.append((rid, o.ecosystem, value, "observed", label_time, arrived, origin[:64]))
                fold.append((o, value, label_time))
                results.append(ItemResult(rid, "joined"))
            elif cur_value == value and cur_source == "observed":
                duplicates.append(o.ecosystem)
                results.append(ItemResult(rid, "duplicate"))
                continue
            else:
                corrections.append({"request_id": rid, "ecosystem": o.ecosystem, "label": value, "source": "observed",
                                    "label_time": label_time, "received_at": arrived, "origin": origin[:64]})
                corrected.append((o.ecosystem, cur_source, "observed"))
                results.append(ItemResult(rid, "correction"))
            current[rid] = (value, "observed")
        if pending and not allow_pending:
            pending = []
        if pending and self._pending + len(pending) > self.max_pending:
            raise FeedbackError(
                len(items) - 1, "request_id",
                f"{len(pending)} labels for unknown request ids would exceed the pending limit of {self.max_pending}",
            )
        # 2. one transaction
        try:
            self.store.apply_labels(first, corrections, pending, consumed)
        except InvalidRecord as exc:  # nothing was applied; name the item if the text rules can
            for idx, item in enumerate(items):
                for fieldname, problem in (("request_id", id_problem(item.request_id)),
                                           ("source", text_problem(item.source))):
                    if problem is not None:
                        raise FeedbackError(idx, fieldname, problem) from exc
            raise FeedbackError(None, "batch", f"the store refused it, nothing was applied: {exc}") from exc
        # 3. count
        if pending:  # the store keeps one label per id, newest first: count what it holds
            self._pending = self.store.count_pending()
        self._count({Event.UNKNOWN_IDS: len(pending)}, duplicates=Counter(duplicates), corrections=Counter(corrected))
        for name, st in self.state.items():
            mine = fold if len(self.state) == 1 else [f for f in fold if f[0].ecosystem == name]
            if mine:
                self._count_labels(st, [o for o, _, _ in mine], np.array([v for _, v, _ in mine]), "observed",
                                   np.array([t for _, _, t in mine]))
        return results

    def _check_pending_label(self, idx: int, label: object) -> None:
        """A label for an outcome not stored yet: its ecosystem is unknown until it arrives, so it
        must at least be a label some served ecosystem can take (else 422 now, not a silent drop
        later)."""
        errors = []
        for spec in self.specs.values():
            try:
                spec.label_value(label)
                return
            except ValueError as exc:
                errors.append(f"{spec.name}: {exc}")
        raise FeedbackError(idx, "label", f"no served ecosystem takes this label ({'; '.join(errors)})")

    def _count_labels(
        self, st: _EcosystemState, items: Sequence[StoredOutcome], values: np.ndarray, source: str,
        label_times: np.ndarray,
    ) -> None:
        """Count a batch of first labels (label part, delays, off-policy sums), vectorised."""
        spec = st.spec
        raw, served, intended, greedy, props_all = spec.align(
            [o.members for o in items], [o.predictions for o in items], [o.served for o in items],
            [o.intended for o in items], [o.greedy for o in items], [o.propensities for o in items])
        preds = spec.codes(raw)
        created = np.array([o.created_at for o in items])
        c = _correct(spec, raw, preds, served, values, items)
        groups = st.groups_of([o.groups for o in items])
        if st.ranking is not None:
            st.ranking.count_labeled(items, values, spec.no_click)
            now = self.clock()
            fresh = np.flatnonzero(label_times >= now - self.window_s)
            if fresh.size:
                st.ranking_bucket(now).count_labeled([items[i] for i in fresh.tolist()], values[fresh], spec.no_click)
        if any(o.candidates for o in items):
            self._count_flips(st, items, raw, served, values, c, groups)
        # the label part only: the outcomes' predictions were counted when they were recorded
        counts = EcosystemCounts.from_arrays(st.shape, preds, c, groups, labels_only=True)
        st.labels[source] = st.labels[source] + counts
        delay = np.maximum(0.0, label_times - created)
        buckets, total = st.delay[source]
        buckets += np.bincount(np.searchsorted(DELAY_BUCKETS_S, delay, side="left"), minlength=len(buckets))
        total[0] += float(delay.sum())
        # off-policy estimates use only rows served as the policy chose (no fallback, no direct call)
        direct = np.array([o.direct for o in items], dtype=bool)
        routed = ~direct & (served == intended) & (served >= 0)
        exploration = None
        if routed.any() and not spec.ranking:  # ranking: list-level estimates are not these
            idx = np.flatnonzero(routed)
            rewards = values[idx] if spec.label_mode == "bandit" else np.maximum(c[idx, served[idx]], 0).astype(float)
            props = props_all[idx]
            exploration = ExplorationCounts.from_arrays(
                spec.members, len(spec.classes), preds[idx], served[idx], rewards, props[np.arange(len(idx)), served[idx]],
                props, greedy[idx],
            )
            exploration.served_outputs[:] = 0  # every outcome's served output was counted when recorded
            st.exploration = st.exploration + exploration
        recent = label_times >= self.clock() - self.window_s
        if recent.all():
            st.window.add(counts, exploration)
        elif recent.any():
            sel = np.flatnonzero(recent)
            sub = {k: [v[i] for i in sel] for k, v in groups.items()} if groups else None
            st.window.add(EcosystemCounts.from_arrays(st.shape, preds[sel], c[sel], sub, labels_only=True))

    @staticmethod
    def _count_flips(st: _EcosystemState, items: Sequence[StoredOutcome], raw: np.ndarray, served: np.ndarray,
                     values: np.ndarray, c: np.ndarray, groups: dict[str, list[str]] | None) -> None:
        """Flips of the candidate versions that ran on these newly labeled outcomes: each
        candidate's correctness is the ecosystem's own rule (`_correct`) applied to the outcome with
        the candidate's output in its member's place."""
        found = _candidate_rows(st.spec, [o.members for o in items], [o.candidates for o in items])
        if found is None:
            return
        rows_c, a_c, keys, cand_raw = found
        cand_correct = _correct_in_place(st.spec, raw, served, values, rows_c, a_c, cand_raw)
        sub = {attr: [col[i] for i in rows_c] for attr, col in groups.items()} if groups else None
        st.flips.count_labeled(keys, a_c, c[rows_c], cand_correct, sub)
        stages_of = [o.stages for o in items]
        staged = _stage_rows(st.spec, [o.members for o in items], [o.candidates for o in items], stages_of) \
            if any(stages_of) else None
        if staged is None:
            return
        # a stage's own correctness: its class against the label, in its member's place; the flips
        # compare the candidate's stage with the serving version's on the same outcomes
        rows_s, a_s, skeys, _links, cand_cls, cur_cls = staged
        correct = c[rows_s].copy()
        correct[np.arange(len(rows_s)), a_s] = _correct_in_place(st.spec, raw, served, values, rows_s, a_s, cur_cls)
        sub = {attr: [col[i] for i in rows_s] for attr, col in groups.items()} if groups else None
        st.flips.count_labeled(skeys, a_s, correct, _correct_in_place(st.spec, raw, served, values, rows_s, a_s,
                                                                      cand_cls), sub)

    def reclaim(self, ledger: str, accepted: dict[str, int]) -> dict[str, int]:
        """Count the records a crashed gateway accepted and never handed over (its ledger's
        `accepted` minus what the store holds of it); a ledger already reclaimed counts nothing."""
        with self._lock:
            lost = self.store.reclaim_ledger(ledger, {str(k): int(v) for k, v in accepted.items()})
            for eco, n in lost.items():
                if eco in self.state:
                    self.events.lost[eco] += n
            return lost

    # ------------------------------------------------------------ sweep
    def sweep(self) -> dict[str, int]:
        """Assume labels for outcomes unlabeled too long; expire pending labels past their TTL."""
        with self._lock, self._cpu("sweep"):
            now = self.clock()
            assumed = 0
            for name, st in self.state.items():
                spec = st.spec
                if spec.assume_label_after_s is None or spec.assumed_label is None:
                    continue
                value = spec.label_value(spec.assumed_label)
                while True:
                    rows = self.store.unlabeled_before(name, now - spec.assume_label_after_s)
                    if not rows:
                        break
                    first = [(o.request_id, name, value, "assumed", o.created_at + spec.assume_label_after_s, now, "sweep")
                             for o in rows]
                    self.store.apply_labels(first, [])
                    self._count_labels(st, rows, np.full(len(rows), value), "assumed",
                                       np.array([f[4] for f in first]))
                    assumed += len(rows)
            expired = self.store.expire_pending(now - self.pending_ttl_s) if self._pending else 0
            self._count({Event.EXPIRED: expired})
            self._pending = max(0, self._pending - expired)
            return {"assumed": assumed, "expired": expired}

    # ------------------------------------------------------------ reads
    @property
    def pending(self) -> int:
        return self._pending

    def reward_stats(self, ecosystem: str) -> tuple[list[int], list[int]]:
        """Per member (successes, failures) over every labeled complete outcome (for the policies)."""
        with self._lock:  # the two sources' per-member arrays only (every hand-over asks)
            observed, assumed = self.state[ecosystem].labels["observed"], self.state[ecosystem].labels["assumed"]
            ok = observed.member_correct + assumed.member_correct
            return [int(v) for v in ok], [int(v) for v in observed.member_n + assumed.member_n - ok]

    def coverage(self, max_age_s: float = 10.0) -> dict[str, dict[float, tuple[int, int]]]:
        """Label coverage by prediction age, per ecosystem (cached for `max_age_s`: it queries the store)."""
        now = self.clock()
        stamp, cached = self._coverage_cache
        if now - stamp < max_age_s and cached:
            return cached
        try:
            fresh = {name: self.store.coverage(name, now, self.coverage_ages_s) for name in self.state}
        except Exception as exc:  # the store is away: a scrape still answers, with the last coverage read
            log.warning("label coverage not refreshed, the outcome store failed: %s", str(exc).splitlines()[0])
            return cached
        self._coverage_cache = (now, fresh)
        return fresh

    # ---------------------------------------------------------- label-free estimates
    def _arrays(self, spec: EcosystemSpec, items: Sequence[StoredOutcome]) -> tuple[np.ndarray, ...]:
        """Predictions (codes), scores (NaN: none) and served index of stored outcomes, as the
        current members see them."""
        raw, served, _, _, _ = spec.align([o.members for o in items], [o.predictions for o in items],
                                          [o.served for o in items], [o.intended for o in items],
                                          [o.greedy for o in items], [o.propensities for o in items])
        scores = np.full((len(items), len(spec.members)), np.nan)
        position = {name: i for i, name in enumerate(spec.members)}
        for i, o in enumerate(items):
            if o.scores:
                for name, v in zip(o.members, o.scores):
                    j = position.get(name)
                    if j is not None and v is not None:
                        scores[i, j] = v
        return raw, spec.codes(raw), scores, served

    def _pages(self, name: str, limit: int, **query: Any) -> Iterator[list[StoredOutcome]]:
        """`store.recent_outcomes` in pages of ESTIMATE_PAGE, up to `limit` (bounded memory)."""
        got = 0
        until = self.clock() + 1.0
        while got < limit:
            page = self.store.recent_outcomes(name, until=until, limit=min(ESTIMATE_PAGE, limit - got), offset=got,
                                              **query)
            if not page:
                return
            yield page
            got += len(page)
            if len(page) < ESTIMATE_PAGE:
                return

    def refresh_estimates(self) -> dict[str, int]:
        """Refit each classification ecosystem's estimator when due (from the newest
        `estimate_reference` labeled outcomes; kept, versioned, in the store), then estimate the
        outcomes of the window still waiting for labels, overall and per subgroup value, and check
        the estimator on outcomes it estimated whose labels came later. Reads the store page by page
        (only arrays and sums are kept); called from the sweep thread. Returns the outcomes
        estimated per ecosystem."""
        now = self.clock()
        out: dict[str, int] = {}
        for name, st in self.state.items():
            spec = st.spec
            if spec.regression or spec.ranking or spec.label_mode == "bandit":
                continue
            est = self.estimators.get(name)
            if est is None or now - est.fitted_at >= self.estimate_refit_s:
                parts = []
                for page in self._pages(name, self.estimate_reference, labeled=True):
                    raw, preds, scores, served = self._arrays(spec, page)
                    labels = np.array([o.label for o in page], dtype=float)
                    parts.append((preds, scores, served, _correct(spec, raw, preds, served, labels, page)))
                if parts:
                    version = est.version + 1 if est is not None else 1
                    preds, scores, served, correct = (np.concatenate([part[k] for part in parts]) for k in range(4))
                    fitted = SystemicEstimator.fit(spec.members, preds, scores, served, correct, now, version)
                    if fitted is not None:
                        self.store.save_estimator(name, version, now, fitted.n_fit, fitted.to_json())
                        est = self.estimators[name] = fitted
            if est is None:
                out[name] = 0
                continue
            result = EcosystemEstimates(version=est.version, fitted_at=est.fitted_at, n_fit=est.n_fit,
                                        base_rate=est.base_rate, n=0)
            sums: dict[tuple[str, str], EstimateSums] = {}
            for page in self._pages(name, self.estimate_max, labeled=False, since=now - self.window_s):
                _, preds, scores, served = self._arrays(spec, page)
                part = est.sums(preds, scores, served)
                sums[("all", "all")] = sums[("all", "all")] + part if ("all", "all") in sums else part
                groups = st.groups_of([o.groups for o in page])
                for attr, values in (groups or {}).items():
                    arr = np.array(values)
                    for value in spec.subgroups[attr]:
                        sel = np.flatnonzero(arr == value)
                        if len(sel):
                            sub = est.sums(preds[sel], scores[sel], served[sel])
                            sums[(attr, value)] = sums[(attr, value)] + sub if (attr, value) in sums else sub
            if ("all", "all") in sums:
                result.n = sums[("all", "all")].n
                result.systemic = {key: est.finish(t) for key, t in sums.items()}
                result.accuracy = est.finish_accuracy(sums[("all", "all")])
            # how good it has been: outcomes it estimated (in the window, waiting) whose labels came later
            checked: EstimateSums | None = None
            realized = 0
            for page in self._pages(name, self.estimate_max, labeled=True, since=est.fitted_at - self.window_s,
                                    label_received_after=est.fitted_at):
                raw, preds, scores, served = self._arrays(spec, page)
                correct = _correct(spec, raw, preds, served, np.array([o.label for o in page], dtype=float), page)
                known = (correct >= 0).all(axis=1)
                if known.any():
                    realized += int((correct[known] == 0).all(axis=1).sum())
                    part = est.sums(preds[known], scores[known], served[known])
                    checked = part if checked is None else checked + part
            if checked is not None and checked.n:
                result.error, result.checked = abs(est.finish(checked).value - realized / checked.n), checked.n
            with self._lock:
                self.estimates[name] = result
            out[name] = result.n
        return out

    # ---------------------------------------------------------- audit
    def audit(self, ecosystem: str, kind: str, limit: int, max_scan: int = AUDIT_MAX_SCAN) -> dict[str, Any]:
        """The audit lists (`GET /v2/ecosystems/{name}/audit`): the newest outcomes every member
        got wrong (`systemic`: by their current label), or the compression-identified exemplars
        (`cie`: the compressed members' modal output differs from the uncompressed ones'), newest
        first, at most `limit`, reading at most `max_scan` stored outcomes."""
        spec = self.specs.get(ecosystem)
        if spec is None:
            raise FeedbackError(None, "ecosystem", f"{ecosystem!r} is not served here", 404)
        if kind not in AUDIT_KINDS:
            raise FeedbackError(None, "kind", f"expected one of {', '.join(AUDIT_KINDS)}, got {kind!r}")
        if kind == "cie" and not (any(spec.compressed) and not all(spec.compressed)):
            raise FeedbackError(None, "kind", f"{ecosystem!r} has no compressed member beside uncompressed ones: "
                                "no compression-identified exemplars")
        items: list[dict[str, Any]] = []
        scanned, until = 0, self.clock()
        while len(items) < limit and scanned < max_scan:
            rows = self.store.recent_outcomes(ecosystem, labeled=True if kind == "systemic" else None, until=until,
                                              limit=min(ESTIMATE_PAGE, max_scan - scanned), offset=scanned)
            if not rows:
                break
            scanned += len(rows)
            raw, served, _, _, _ = spec.align([o.members for o in rows], [o.predictions for o in rows],
                                              [o.served for o in rows], [o.intended for o in rows],
                                              [o.greedy for o in rows], [o.propensities for o in rows])
            preds = spec.codes(raw)
            if kind == "systemic":
                labels = np.array([o.label for o in rows], dtype=np.float64)
                hit = (_correct(spec, raw, preds, served, labels, rows) == 0).all(axis=1)
            else:
                from telemetry.counts import cie_mask

                hit = (preds >= 0).all(axis=1) & cie_mask(preds, spec.shape)
            for i in np.flatnonzero(hit)[: limit - len(items)]:
                items.append(self._audit_item(spec, rows[int(i)], raw[int(i)], int(served[int(i)])))
        return {"ecosystem": ecosystem, "kind": kind, "limit": limit, "scanned": scanned,
                "scan_limit_reached": scanned >= max_scan, "items": items}

    @staticmethod
    def _audit_item(spec: EcosystemSpec, o: StoredOutcome, raw: np.ndarray, served: int) -> dict[str, Any]:
        def output(v: Any) -> Any:
            if spec.regression:
                return None if v != v else float(v)
            return spec.classes[int(v)] if v >= 0 else None

        label: Any = o.label
        if label is not None and not spec.regression and spec.label_mode != "bandit":
            label = spec.classes[int(label)]
        return {"request_id": o.request_id, "created_at": o.created_at,
                "outputs": {m: output(v) for m, v in zip(spec.members, raw.tolist())},
                "served": spec.members[served] if served >= 0 else None,
                "label": label, "label_source": o.label_source, "subgroups": o.groups}

    def check_store(self) -> bool:
        """Ask the store a trivial question (the recorder's periodic health check): whether it
        answered. A store that answers but cannot be written (a full disk) still shows as down
        through the failing hand-overs, until one succeeds."""
        try:
            self.store.ping()
        except Exception as exc:
            if self.check_failing_since is None:
                log.warning("the outcome store does not answer: %s", str(exc).splitlines()[0] if str(exc) else exc)
                self.check_failing_since = self.clock()
            return False
        if self.check_failing_since is not None:
            log.warning("the outcome store answers again")
        self.check_failing_since = None
        return True

    @property
    def store_down_since(self) -> float | None:
        """Since when the store has been failing (its check or the hand-overs), or None: up."""
        failing = [t for t in (self.handover_failing_since, self.check_failing_since) if t is not None]
        return min(failing) if failing else None

    def snapshot(self) -> RecorderSnapshot:
        """The counts at this moment, copied (what the Prometheus collector reads)."""
        coverage = self.coverage()  # reads the store (cached for a few seconds): outside the lock
        with self._lock:
            ecosystems = {
                name: EcosystemSnapshot(
                    spec=st.spec, outcomes=st.outcomes, incomplete=st.incomplete, direct=st.direct,
                    explored=st.explored, missing=st.missing.copy(), served=st.served.copy(),
                    served_propensity=st.served_propensity.copy(), fallbacks=st.fallbacks.copy(),
                    served_outputs=st.served_outputs.copy(), predictions=st.predictions, labels=dict(st.labels),
                    delay={src: (buckets.copy(), total[0]) for src, (buckets, total) in st.delay.items()},
                    window=st.window.total(), flips=st.flips + CandidateFlips(st.shape) if st.flips.recorded else None,
                    ranking=st.ranking + RankingCounts(st.ranking.members, st.ranking.n_items, st.ranking.k)
                    if st.ranking is not None else None,
                    ranking_window=st.ranking_window_total(self.clock()),
                )
                for name, st in self.state.items()
            }
            return RecorderSnapshot(
                ecosystems=ecosystems, events=self.events.copy(), pending=self._pending, dropped=self.dropped(),
                handover_failures=self.handover_failures, handover_failing_since=self.handover_failing_since,
                store_down_since=self.store_down_since,
                window_s=self.window_s, cpu_s=dict(self.cpu_s), serving=self.serving_report(), coverage=coverage,
                coverage_ages_s=self.coverage_ages_s, estimates=dict(self.estimates),
            )

    def window_totals(self, ecosystem: str) -> tuple[EcosystemCounts, ExplorationCounts]:
        with self._lock:
            return self.state[ecosystem].window.total()

    def dropped(self) -> dict[str, int]:
        """Records dropped, by reason: the gateways' (`queue_full`) and the recorder's own
        (`invalid`: records the store refused)."""
        out: dict[str, int] = {"invalid": self.events[Event.INVALID_OUTCOMES]}
        for report in self.reports.values():
            for reason, v in report.get("dropped", {}).items():
                out[reason] = out.get(reason, 0) + v
        return out

    def serving_report(self) -> dict[str, Any]:
        return merge_reports([r.get("serving", {}) for r in self.reports.values()])

