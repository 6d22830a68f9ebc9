"""The data plane of one ecosystem: route, fan out, fall back, build the outcome of every row.

No HTTP here (the REST adapter is `serving.http`) and no Ray (members are reached
through `serving.members`). Per request:

1. the policy decides, per row, the served member and the propensity vector;
2. the served members, and the shadow members (all others, on a configured share
   of requests), run concurrently, each under `member_timeout_s`;
3. a member that errors or times out has a missing output (-1, NaN for a regression value) for
   those rows;
   where the served member is missing, the policy's next choice that answered
   serves and the row is marked `fallback`; if none answered: 503 with the reasons;
4. every row becomes an `Outcome` (all members' outputs) handed to the outcome sink.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.manifest import EcosystemManifest
from serving.config import EcosystemServeConfig
from serving.errors import Unavailable
from serving.members import MemberCall, Prediction, split_prediction, stage_info
from serving.policies import Decision, Policy
from telemetry.estimation import SystemicEstimator
from telemetry.records import Outcome, round_scores
from telemetry.serving_stats import ServingStats

__all__ = ["Outcome", "InferResult", "EcosystemRunner", "OutcomeSink"]

log = logging.getLogger(__name__)


@dataclass
class InferResult:
    labels: np.ndarray  # served class ids (n,); served values (float64) for a regression ecosystem
    probabilities: np.ndarray | None  # served class scores (n, C)
    outcomes: list[Outcome]
    # per row: P(every member wrong) from the latest fitted label-free estimator; None before one
    risks: np.ndarray | None = None
    # ranking: the item ids shown, in slot order (n, k), each one's propensity of being in its slot
    # (n, k) and the served member's score of it (n, k)
    ranking: np.ndarray | None = None
    slot_propensities: np.ndarray | None = None
    ranking_scores: np.ndarray | None = None


OutcomeSink = Callable[[list[Outcome]], None]


def _fingerprints(x: np.ndarray) -> list[str]:
    return [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in x]


class EcosystemRunner:
    def __init__(
        self,
        manifest: EcosystemManifest,
        members: list[MemberCall],
        policy: Policy,
        cfg: EcosystemServeConfig,
        sink: OutcomeSink | None = None,
        seed: int | None = None,
        stats: ServingStats | None = None,
        candidates: dict[int, MemberCall] | None = None,
    ) -> None:
        self.manifest = manifest
        self.members = members
        self.names = tuple(m.name for m in members)
        self.versions = tuple(m.version for m in members)
        # candidate versions in shadow (`candidates` in the ecosystem's config): member index ->
        # the candidate's call, run as fan-out index len(members) + k; recorded, never served
        self.candidates = sorted((candidates or {}).items())
        self._calls = [*members, *(c for _, c in self.candidates)]
        self._call_names = [*self.names, *(f"{c.name}@{c.version}" for _, c in self.candidates)]
        # per fan-out index: a pipeline member's stages (name, version), recorded with each outcome
        self._stages = [self._stage_names(c) for c in self._calls]
        self.policy = policy
        # the recorder's latest fitted estimator (handed over with its replies): per-row risk
        self.estimator: SystemicEstimator | None = None
        # record each member's whole score vector too (telemetry.score_vector_max_classes)
        self.score_vectors = False
        self.cfg = cfg
        self.sink = sink
        self.stats = stats or ServingStats()
        self._rng = np.random.default_rng(seed)
        self.n_classes = len(manifest.classes)
        self.regression = manifest.task == "regression"
        self.k = manifest.ranking.k if manifest.ranking is not None else 0  # ranking: the list length
        self.version = hashlib.sha1(
            ",".join(f"{n}:{v}" for n, v in zip(self.names, self.versions)).encode()
        ).hexdigest()[:8]

    async def _fanout_now(self, x: np.ndarray, needed: list[int]) -> dict[int, Prediction | BaseException]:
        """Run the needed members on x concurrently; failures are returned, not raised."""
        return dict(zip(needed, await asyncio.gather(*(self._call(a, x) for a in needed))))

    async def fanout(self, x: np.ndarray, needed: list[int]) -> dict[int, Prediction | BaseException]:
        """Overridable: the gateway replaces it with a dynamically batched version (serving.app)."""
        return await self._fanout_now(x, needed)

    def enable_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Batch concurrent requests of this ecosystem into one fan-out (Serve's `@serve.batch`).

        Calls waiting together are concatenated along the batch axis; every member that any
        of them needs runs once on the joined rows, and the results are split back. One queue
        per ecosystem (not per member) keeps the batching overhead to one wait per request.
        Needs a Serve replica.
        """
        from ray import serve

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def batched(xs: list[np.ndarray], neededs: list[list[int]]) -> list[dict[int, Prediction | BaseException]]:
            if len(xs) == 1:
                return [await self._fanout_now(xs[0], neededs[0])]
            union = sorted(set().union(*neededs))
            sizes = [x.shape[0] for x in xs]
            joined = await self._fanout_now(np.concatenate(xs, axis=0), union)
            split: dict[int, list[Prediction | BaseException]] = {}
            for a, r in joined.items():
                split[a] = [r] * len(xs) if isinstance(r, BaseException) else list(split_prediction(r, sizes))
            return [{a: split[a][k] for a in needed} for k, needed in enumerate(neededs)]

        async def fanout(x: np.ndarray, needed: list[int]) -> dict[int, Prediction | BaseException]:
            # (serve.batch's typing sees the batched signature, lists, not the per-call one)
            result: dict[int, Prediction | BaseException] = await batched(x, needed)  # type: ignore[arg-type]
            return result

        self.fanout = fanout  # type: ignore[method-assign]

    def index(self, member: str) -> int:
        return self.names.index(member)

    async def _call(self, a: int, x: np.ndarray) -> Prediction | BaseException:
        member, name = self._calls[a], self._call_names[a]
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(member.predict(x), timeout=self.cfg.member_timeout_s)
        except TimeoutError:
            self.stats.error(self.manifest.name, name, "timeout")
            return TimeoutError(f"{name}: no answer within {self.cfg.member_timeout_s} s")
        except Exception as exc:  # a member's failure is recorded as a missing output, never raised
            self.stats.error(self.manifest.name, name, "error")
            return exc
        self.stats.observe(self.manifest.name, name, member.provider, time.perf_counter() - t0)
        return result

    async def infer(
        self,
        x: np.ndarray,
        request_ids: list[str],
        groups: list[dict[str, str]],
        direct_member: int | None = None,
        candidates: np.ndarray | None = None,
    ) -> InferResult:
        """`candidates` (ranking): per row, which catalogue items may be listed ((n, items) bool)."""
        n, m = x.shape[0], len(self.members)
        if direct_member is not None:
            onehot = tuple(1.0 if a == direct_member else 0.0 for a in range(m))
            decisions = [Decision(direct_member, onehot, self.policy.greedy())] * n
        else:
            decisions = self.policy.decide(n)
        served_set = {d.served for d in decisions}
        run_shadow = self.cfg.shadow_fraction >= 1.0 or self._rng.random() < self.cfg.shadow_fraction
        needed = list(range(m)) if run_shadow else sorted(served_set)
        if self.candidates and (self.cfg.candidate_share >= 1.0 or self._rng.random() < self.cfg.candidate_share):
            needed += [m + k for k, (a, _) in enumerate(self.candidates) if a in needed]
        results = await self.fanout(x, needed)
        cand_results = {k: results.pop(m + k) for k in range(len(self.candidates)) if m + k in results}
        # a missing output: -1 for a class id, NaN for a regression value
        preds = np.full((n, m), np.nan) if self.regression else np.full((n, m), -1, dtype=np.int64)
        for a, r in results.items():
            if not isinstance(r, BaseException):
                preds[:, a] = r[0]
        answered = self._answered(preds)
        served = np.array([d.served for d in decisions], dtype=np.int64)
        failed_rows = np.flatnonzero(~answered[np.arange(n), served])
        if failed_rows.size:
            if direct_member is not None:
                raise Unavailable(f"member {self.names[direct_member]} failed: {self._reason(results, direct_member)}")
            missing = [a for a in range(m) if a not in results]
            if missing:  # shadows were skipped on this request: run them now as fallbacks
                for a, r in (await self._fanout_now(x, missing)).items():
                    results[a] = r
                    if not isinstance(r, BaseException):
                        preds[:, a] = r[0]
                answered = self._answered(preds)
            for i in failed_rows:
                alt = next((a for a in self.policy.fallback_order(decisions[i]) if answered[i, a]), None)
                if alt is None:
                    reasons = "; ".join(f"{self.names[a]}: {self._reason(results, a)}" for a in range(m))
                    raise Unavailable(f"no member of {self.manifest.name!r} could answer ({reasons})")
                served[i] = alt
        ranked = self._rankings(results, served, n, m, candidates) if self.k else None
        if ranked:  # a ranking member's prediction is the first item of its list (of the candidates)
            for a, top in enumerate(ranked[5]):
                if top is not None:
                    preds[:, a] = top[:, 0]
        labels = preds[np.arange(n), served]
        probs = None
        first = results[int(served[0])]
        if not isinstance(first, BaseException) and first[1] is not None:
            probs = np.empty((n, first[1].shape[1]), dtype=np.float32)
            for a in set(served.tolist()):
                r = results[a]
                assert not isinstance(r, BaseException) and r[1] is not None
                rows = served == a
                probs[rows] = r[1][rows]
        now = time.time()
        fps = _fingerprints(x)
        row_scores: list[tuple[float, ...]] = [()] * n
        row_vectors: list[tuple[tuple[float, ...] | None, ...]] = [()] * n
        risks = None
        if self.regression:  # None: a missing value (JSON null in the store)
            row_values = [tuple(None if v != v else v for v in row) for row in preds.tolist()]
        else:
            row_values = [tuple(row) for row in preds.tolist()]
            # each member's score for the class it predicted (label-free estimates calibrate these)
            scores = np.full((n, m), np.nan)
            rows_ = np.arange(n)
            for a, r in results.items():
                if not isinstance(r, BaseException) and r[1] is not None and r[1].ndim == 2:
                    got = preds[:, a] >= 0
                    cls = np.clip(preds[:, a], 0, r[1].shape[1] - 1)
                    scores[:, a] = np.where(got, r[1][rows_, cls], np.nan)
            scores = round_scores(scores)
            if np.isfinite(scores).any():
                row_scores = [tuple(row) for row in scores.tolist()]
            if self.score_vectors:
                row_vectors = self._score_vectors(results, preds, n, m)
            est = self.estimator
            if est is not None and est.members == self.names:
                risks = est.risk(preds, scores, served)
        cand_rows = self._candidate_rows(cand_results, n) if cand_results else [()] * n
        stage_rows = self._stage_rows(results, cand_results, n) if any(self._stages) else [()] * n
        outcomes = [
            Outcome(
                request_id=request_ids[i],
                ecosystem=self.manifest.name,
                time_s=now,
                members=self.names,
                versions=self.versions,
                predictions=row_values[i],
                served=int(served[i]),
                intended=decisions[i].served,
                propensities=decisions[i].propensities,
                greedy=decisions[i].greedy,
                policy="direct" if direct_member is not None else self.policy.kind,
                direct=direct_member is not None,
                groups=groups[i],
                input_fingerprint=fps[i],
                scores=row_scores[i],
                score_vectors=row_vectors[i],
                candidates=cand_rows[i],
                stages=stage_rows[i],
                rankings=ranked[0][i] if ranked else (),
                shown=ranked[1][i] if ranked else (),
            )
            for i in range(n)
        ]
        for a, r in results.items():
            if isinstance(r, BaseException):
                log.warning("member %s.%s missing on %d rows: %s", self.manifest.name, self.names[a], n, r)
        if self.sink is not None:
            self.sink(outcomes)
        if ranked:
            return InferResult(labels=labels, probabilities=probs, outcomes=outcomes, risks=risks, ranking=ranked[2],
                               slot_propensities=ranked[3], ranking_scores=ranked[4])
        return InferResult(labels=labels, probabilities=probs, outcomes=outcomes, risks=risks)

    def _rankings(self, results: dict[int, Prediction | BaseException], served: np.ndarray, n: int, m: int,
                  candidates: np.ndarray | None = None,
                  ) -> tuple[list[tuple[tuple[int, ...] | None, ...]], list[tuple[Any, ...]], np.ndarray, np.ndarray,
                             np.ndarray, list[np.ndarray | None]]:
        """Ranking: each member's top-k items (its k highest scores; ties to the lower item id), and
        the served member's list as shown: with probability `position_shuffle_rate` a row's list is
        shuffled uniformly, so an item's propensity of its slot is (1 - r) [slot = its rank] + r / k.
        Only the row's `candidates` may be listed, where given. Returns per row the members' lists and
        (shown ids, slot propensities, each shown item's rank in the served list, shuffled or not), the
        members' lists as arrays, and the shown ids,
        propensities and served scores as (n, k) arrays."""
        k, r = self.k, self.cfg.position_shuffle_rate
        tops: list[np.ndarray | None] = [None] * m
        for a, res in results.items():
            if not isinstance(res, BaseException) and res[1] is not None:
                scores_a = np.asarray(res[1], dtype=np.float64)
                if candidates is not None:  # only the request's candidate items may be listed
                    scores_a = np.where(candidates, scores_a, -np.inf)
                tops[a] = np.argsort(-scores_a, axis=1, kind="stable")[:, :k]
        lists = [tuple(None if t is None else tuple(t[i].tolist()) for t in tops) for i in range(n)]
        order = np.tile(np.arange(k), (n, 1))
        shuffled = self._rng.random(n) < r if r > 0 else np.zeros(n, dtype=bool)
        for j in np.flatnonzero(shuffled).tolist():
            order[j] = self._rng.permutation(k)
        shown = np.empty((n, k), dtype=np.int64)
        scores = np.empty((n, k), dtype=np.float32)
        for i in range(n):
            top = tops[int(served[i])]
            assert top is not None  # a served member answered
            shown[i] = top[i][order[i]]
            res = results[int(served[i])]
            assert not isinstance(res, BaseException) and res[1] is not None
            scores[i] = res[1][i][shown[i]]
        props = (1 - r) * (order == np.arange(k)) + r / k
        rows = [(tuple(shown[i].tolist()), tuple(props[i].tolist()), tuple(order[i].tolist()), int(shuffled[i]))
                for i in range(n)]
        return lists, rows, shown, props, scores, tops

    def _candidate_rows(self, got: dict[int, Prediction | BaseException],
                        n: int) -> list[tuple[tuple[int, str, str, Any, float | None], ...]]:
        """Per row: (member index, the version it serves, candidate version, the candidate's output,
        its score of that output) of each candidate that ran (output -1 / None and score None where
        it failed)."""
        cols = []
        for k, r in got.items():
            a, call = self.candidates[k]
            if isinstance(r, BaseException):
                log.warning("candidate %s.%s@%s missing on %d rows: %s", self.manifest.name, call.name, call.version, n, r)
                vals: list[Any] = [None if self.regression else -1] * n
                scores: list[float | None] = [None] * n
            elif self.regression:
                vals = [None if v != v else float(v) for v in np.asarray(r[0], dtype=float).tolist()]
                scores = [None] * n
            else:
                cls = np.asarray(r[0], dtype=np.int64)
                vals = cls.tolist()
                if r[1] is not None and r[1].ndim == 2:
                    sc = round_scores(r[1][np.arange(n), np.clip(cls, 0, r[1].shape[1] - 1)].astype(float))
                    scores = [None if (c < 0 or v != v) else v for c, v in zip(vals, sc.tolist())]
                else:
                    scores = [None] * n
            cols.append([(a, self.versions[a], call.version, v, sc_) for v, sc_ in zip(vals, scores)])
        return [tuple(col[i] for col in cols) for i in range(n)]

    def _stage_names(self, call: MemberCall) -> tuple[tuple[str, str], ...]:
        try:
            spec = self.manifest.member(call.name, call.version)
        except KeyError:
            return ()
        return tuple((st.name, st.version) for st in spec.stages)

    def _stage_rows(self, results: dict[int, Prediction | BaseException], cands: dict[int, Prediction | BaseException],
                    n: int) -> list[tuple[tuple[int, int, str, str, str, int | None, float | None], ...]]:
        """Per row: what each pipeline member that answered recorded of its stages (`Outcome.stages`),
        the serving versions' (role 0) and the candidates' (role 1)."""
        m = len(self.members)
        runs = [(a, 0, a, r) for a, r in results.items()]
        runs += [(self.candidates[k][0], 1, m + k, r) for k, r in cands.items()]
        per_row: list[list[tuple[int, int, str, str, str, int | None, float | None]]] = [[] for _ in range(n)]
        for a, role, call, r in runs:
            names = self._stages[call]
            info = None if isinstance(r, BaseException) else stage_info(r)
            if not names or info is None or info.shape[1] != len(names):
                continue
            for i, row in enumerate(info.tolist()):
                for (name, version), (cls, score, fp) in zip(names, row):
                    per_row[i].append((a, role, name, version, f"{int(fp):012x}", int(cls) if cls >= 0 else None,
                                       None if score != score else round(score, 6)))
        return [tuple(r) for r in per_row]

    def _score_vectors(self, results: dict[int, Prediction | BaseException], preds: np.ndarray, n: int,
                       m: int) -> list[tuple[tuple[float, ...] | None, ...]]:
        """Per row, per member: its scores of every class (None: no output, or no scores)."""
        per: list[list[tuple[float, ...] | None]] = []
        for a in range(m):
            r = results.get(a)
            if r is None or isinstance(r, BaseException) or r[1] is None or r[1].ndim != 2:
                per.append([None] * n)
            else:
                got = (preds[:, a] >= 0).tolist()
                per.append([tuple(v) if ok else None for v, ok in zip(r[1].tolist(), got)])
        return [tuple(col[i] for col in per) for i in range(n)]

    def _answered(self, preds: np.ndarray) -> np.ndarray:
        """Where each member gave an output: not -1 (a class id), not NaN (a regression value)."""
        return ~np.isnan(preds) if self.regression else preds >= 0

    @staticmethod
    def _reason(results: dict[int, Prediction | BaseException], a: int) -> str:
        r = results.get(a)
        if r is None:
            return "not run"
        return str(r) if isinstance(r, BaseException) else "ok"
