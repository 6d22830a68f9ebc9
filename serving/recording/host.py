"""The recorder with its store and sweep thread (`RecorderHost`), and what a gateway needs to use
one in its own process (`LocalTelemetry`). No Ray here: a recorder process
(`serving.recording.process`) runs this without importing Ray; `serving.recording.deployment`
wraps it as a Serve deployment.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from models.manifest import load_manifest
from serving.config import PrimaryPolicyConfig, ServingConfig, TelemetryConfig
from serving.errors import Forbidden, NotFound, Unavailable, UnprocessableEntity
from telemetry.metrics import exposition
from telemetry.recorder import FeedbackError, LabelItem, Recorder
from telemetry.records import Outcome, outcome_fields
from telemetry.spec import EcosystemSpec
from telemetry.store import STORE_ERRORS, open_store

__all__ = ["RecorderHost", "LocalTelemetry", "recorder_specs", "feedback_reply", "audit_reply", "raise_for_reply"]

log = logging.getLogger("ray.serve")


def _malloc_trim() -> Callable[[], object]:
    """glibc's `malloc_trim(0)`: hand the pages of freed memory back to the kernel (a no-op elsewhere).

    Why: the recorder's Python heap stays flat under steady load (tracemalloc: ~45 MiB over a
    10-minute soak), but glibc keeps freed memory of its periodic large reads (the estimate
    refresh and refit decode up to 20,000 stored outcomes at a time) mapped, so the process's
    resident size climbed by tens of MiB before levelling off (docs/reliability.md)."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others: nothing to call
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


MALLOC_TRIM = _malloc_trim()


def recorder_specs(cfg: ServingConfig) -> dict[str, EcosystemSpec]:
    """The recorder's view of each served ecosystem, from its manifest and config."""
    specs = {}
    for name, eco in cfg.ecosystems.items():
        manifest = load_manifest(Path(cfg.model_repository) / name)
        current = {m.name: m for m in manifest.served_members(eco.versions)}
        members = list(eco.members or current)
        reference = members.index(eco.policy.primary) if isinstance(eco.policy, PrimaryPolicyConfig) else 0
        reg = manifest.regression
        specs[name] = EcosystemSpec(
            name=name,
            members=tuple(members),
            classes=manifest.label_classes if reg is None else reg.bin_names(),
            subgroups=dict(manifest.subgroups),
            intersections=manifest.intersections,
            compressed=tuple(current[m].compressed for m in members),
            reference=reference,
            label_mode=eco.label_mode,
            assume_label_after_s=eco.assume_label_after_s,
            assumed_label=eco.assumed_label,
            task=manifest.task,
            k=manifest.ranking.k if manifest.ranking is not None else 0,
            tolerance=0.0 if reg is None else reg.tolerance,
            bin_low=0.0 if reg is None else reg.range[0],
            bin_width=1.0 if reg is None else reg.width,
        )
        if eco.assumed_label is not None:
            try:
                specs[name].label_value(eco.assumed_label)
            except ValueError as exc:
                raise ValueError(f"ecosystems.{name}.assumed_label: {exc}") from None
    return specs


def _error_reply(call: Callable[[], dict[str, Any]], what: str) -> dict[str, Any]:
    """`call()`, or its error as a value that crosses processes and handles:
    `{"error": message, "status": 422 or 503}` (`raise_for_reply` turns it back)."""
    try:
        return call()
    except FeedbackError as exc:
        return {"error": str(exc), "status": exc.status}
    except STORE_ERRORS as exc:  # the store unreachable or full: nothing was applied, the client retries
        log.warning("%s not applied, the outcome store failed: %s", what, exc)
        return {"error": f"the outcome store is unavailable, nothing was applied; retry later "
                         f"({str(exc).splitlines()[0]})", "status": 503}


def outcomes_reply(recorder: Recorder, items: list[tuple[Any, ...]]) -> dict[str, Any]:
    """The recorder's answer to `POST /v2/outcomes` (outcome field tuples)."""
    return _error_reply(lambda: recorder.record_outside(items), "outcomes")


def feedback_reply(recorder: Recorder, items: list[LabelItem], scope: frozenset[str] | None = None) -> dict[str, Any]:
    """The recorder's answer to a feedback batch (errors as `_error_reply` says)."""

    def apply() -> dict[str, Any]:
        results = recorder.feedback(items, scope)
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        return {
            "accepted": len(results),
            "counts": counts,
            "results": [
                {"request_id": r.request_id, "status": r.status, "unknown_request_id": r.unknown_request_id}
                for r in results
            ],
        }

    return _error_reply(apply, "feedback")


def audit_reply(recorder: Recorder, ecosystem: str, kind: str, limit: int) -> dict[str, Any]:
    """The recorder's answer to `GET /v2/ecosystems/{name}/audit` (errors as `_error_reply` says)."""
    return _error_reply(lambda: recorder.audit(ecosystem, kind, limit), "audit")


def raise_for_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """A feedback reply, or its error as the serving error of its status (403, 404, 422 or 503)."""
    if "error" in reply:
        status = reply.get("status")
        raise (Unavailable if status == 503 else Forbidden if status == 403 else NotFound if status == 404
               else UnprocessableEntity)(reply["error"])
    return reply


class TelemetryHost(Protocol):
    def feedback(self, items: list[LabelItem], scope: frozenset[str] | None = None) -> dict[str, Any]: ...
    def audit(self, ecosystem: str, kind: str, limit: int) -> dict[str, Any]: ...
    def outcomes(self, items: list[tuple[Any, ...]]) -> dict[str, Any]: ...
    def metrics(self) -> bytes: ...


class LocalTelemetry:
    """The telemetry backend of a gateway whose recorder it owns: a `RecorderHost` in its process,
    or a `RecorderProcess` (both answer `feedback` and `metrics`; blocking calls, run on a thread)."""

    def __init__(self, host: TelemetryHost) -> None:
        self.host = host

    async def feedback(self, items: list[LabelItem], scope: frozenset[str] | None = None) -> dict[str, Any]:
        return raise_for_reply(await asyncio.to_thread(self.host.feedback, items, scope))

    async def outcomes(self, items: list[tuple[Any, ...]]) -> dict[str, Any]:
        return raise_for_reply(await asyncio.to_thread(self.host.outcomes, items))

    async def audit(self, ecosystem: str, kind: str, limit: int) -> dict[str, Any]:
        return raise_for_reply(await asyncio.to_thread(self.host.audit, ecosystem, kind, limit))

    async def metrics(self) -> bytes:
        return await asyncio.to_thread(self.host.metrics)


class RecorderHost:
    """A recorder with its store and sweep thread: the body of the Recorder deployment, and what a
    gateway runs in-process with `telemetry.recorder_in_gateway`."""

    def __init__(self, specs: dict[str, EcosystemSpec], telemetry: dict[str, Any]) -> None:
        cfg = TelemetryConfig.model_validate(telemetry)
        self.store = open_store(cfg.resolved_store_url())
        self.recorder = Recorder(
            specs,
            self.store,
            pending_ttl_s=cfg.pending_ttl_s,
            max_pending=cfg.max_pending,
            window_s=cfg.window_s,
            window_buckets=cfg.window_buckets,
            coverage_ages_s=cfg.coverage_ages_s,
            estimate_refit_s=cfg.estimation.refit_interval_s,
            estimate_reference=cfg.estimation.reference_size,
            estimate_max=cfg.estimation.max_estimated,
        )
        self._estimation = cfg.estimation
        log.info("recorder ready on %s store; %d outcomes stored", self.store.backend, self.store.count_outcomes())
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, args=(cfg.sweep_interval_s,), daemon=True)
        self._sweeper.start()

    def _sweep_loop(self, interval_s: float) -> None:
        last_estimate = 0.0
        while not self._stop.wait(interval_s):
            if not self.recorder.check_store():
                continue  # no sweep against a store that does not answer
            try:
                self.recorder.sweep()
            except Exception as exc:  # the sweep retries next period; never kill the thread
                log.warning("recorder sweep failed: %s", exc)
            if self._estimation.enabled and time.monotonic() - last_estimate >= self._estimation.interval_s:
                last_estimate = time.monotonic()
                try:
                    self.recorder.refresh_estimates()
                except Exception as exc:  # stale estimates until the next period
                    log.warning("label-free estimates not refreshed: %s", exc)
            MALLOC_TRIM()

    def record(self, outcomes: list[Outcome], reporter: str, report: dict[str, Any]) -> dict[str, Any]:
        return self.record_fields(list(map(outcome_fields, outcomes)), reporter, report)

    def record_fields(self, items: list[tuple[Any, ...]], reporter: str, report: dict[str, Any]) -> dict[str, Any]:
        stats: dict[str, Any] = self.recorder.record_fields(items, reporter, report)
        stats["rewards"] = {eco: self.recorder.reward_stats(eco) for eco in self.recorder.specs}
        stats["store_up"] = self.recorder.store_down_since is None
        # fitted label-free estimators the gateway lacks (it says which versions it holds): per-row risk
        known = (report.get("serving") or {}).get("estimator_versions") or {}
        stats["estimators"] = {eco: est.to_json() for eco, est in self.recorder.estimators.items()
                               if known.get(eco) != est.version}
        return stats

    def feedback(self, items: list[LabelItem], scope: frozenset[str] | None = None) -> dict[str, Any]:
        return feedback_reply(self.recorder, items, scope)

    def outcomes(self, items: list[tuple[Any, ...]]) -> dict[str, Any]:
        return outcomes_reply(self.recorder, items)

    def audit(self, ecosystem: str, kind: str, limit: int) -> dict[str, Any]:
        return audit_reply(self.recorder, ecosystem, kind, limit)

    def reclaim(self, ledger: str, accepted: dict[str, int]) -> dict[str, int]:
        return self.recorder.reclaim(ledger, accepted)

    def metrics(self) -> bytes:
        return exposition(self.recorder)

    def sweep(self) -> dict[str, int]:
        return self.recorder.sweep()

    def close(self) -> None:
        self._stop.set()
        self.store.close()

    def __del__(self) -> None:
        self.close()
